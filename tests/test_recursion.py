"""Recursive shared blocks (Relaxed Recursive Transformers): the CYCLE / SEQUENCE / middle index
maps, parameters that exist once per unique block, scanned == unrolled, shared gradients that sum
the per-depth gradients of an untied copy, conversion inits and SVD relaxation, cached decoding,
early exits, and a compiled program whose size does not grow with the number of loops."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import ConfigError, load_config
from layerjax.interop.mapping import param_leaves
from layerjax.model.plan import build_plan, recursion_map
from layerjax.model.recursive import block_sources, convert_params, recursive_config
from layerjax.model.transformer import Transformer

BASE = ["model.vocab_size=48", "model.num_layers=6", "model.d_model=16", "model.num_heads=2", "model.canon=",
        "model.max_seq_len=16", "data.seq_len=16", "data.batch_size=4", "mesh.num_devices=1",
        "optim.warmup_steps=0"]
PATTERNS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 12)), jnp.int32)


def config(*overrides):
    return load_config(None, [*BASE, *overrides])


def recursive(pattern="cycle", blocks=2, *extra):
    return config(f"model.recursion.blocks={blocks}", f"model.recursion.pattern={pattern}", *extra)


def split(cfg, seed=0):
    return nnx.split(Transformer(cfg.model, nnx.Rngs(seed)), nnx.Param)


def logits_of(graph, params):
    return jax.jit(lambda p: nnx.merge(graph, p)(TOKENS)[0])(params)


def grads_of(graph, params):
    return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graph, p)(TOKENS)[0] ** 2)))(params)


def perturbed(params, scale=0.05):
    """Nonzero relaxation (B starts at zero) and non-unit norm gains, so nothing is trivially equal."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_index_maps():
    assert recursion_map(6, 3, "cycle") == [0, 1, 2, 0, 1, 2]
    assert recursion_map(6, 3, "sequence") == [0, 0, 1, 1, 2, 2]
    assert recursion_map(8, 3, "middle_cycle") == [None, 0, 1, 2, 0, 1, 2, None]
    assert recursion_map(8, 3, "middle_sequence") == [None, 0, 0, 1, 1, 2, 2, None]
    assert recursion_map(4, 0, "cycle") == [None] * 4
    plan = build_plan(recursive("middle_cycle", 2).model)
    assert [(s.first_layer, s.num_layers, s.blocks) for s in plan.segments] == [
        (0, 1, None), (1, 4, (0, 1, 0, 1)), (5, 1, None)]
    assert "shared 1" in plan.table() and "own" in plan.table()


def test_a_recursive_model_has_exactly_its_unique_blocks_and_relaxations():
    untied = param_leaves(split(config())[1])
    per_layer = sum(v.size for p, v in untied.items() if p.startswith("stacks.")) // 6
    outside = sum(v.size for p, v in untied.items() if not p.startswith("stacks."))
    for pattern, unique_layers in (("cycle", 2), ("middle_sequence", 2 + 2)):
        leaves = param_leaves(split(recursive(pattern, 2, "model.recursion.lora_rank=3",
                                              "model.recursion.lora_rank_mlp=2"))[1])
        relax = sum(v.size for p, v in leaves.items() if ".relax." in p)
        d, f = 16, load_config(None, BASE).model.d_ff or 64
        shared_depths = 6 if pattern == "cycle" else 4
        expected_relax = shared_depths * (3 * 4 * (d + d) + 2 * (2 * (d + f) + (f + d)))  # q,k,v,o at rank 3; gate,up,down at 2
        assert relax == expected_relax, pattern
        assert sum(v.size for v in leaves.values()) == outside + unique_layers * per_layer + relax, pattern


# cycle and middle_sequence cover both block orders and the unshared first and last layers; the
# other two patterns take the same code paths and wait for -m slow.
@pytest.mark.parametrize("pattern", [p if p in ("cycle", "middle_sequence") else pytest.param(p, marks=pytest.mark.slow)
                                     for p in PATTERNS])
def test_scanned_equals_unrolled_logits_and_gradients(pattern):
    cfg = recursive(pattern, 2, "model.recursion.lora_rank=2")
    graph, params = split(cfg)
    params = perturbed(params)
    unrolled_cfg = dataclasses.replace(cfg.model, scan_layers=False)
    unrolled_graph, _ = nnx.split(nnx.eval_shape(lambda: Transformer(unrolled_cfg, nnx.Rngs(0))), nnx.Param)
    np.testing.assert_allclose(logits_of(graph, params), logits_of(unrolled_graph, params), atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_of(graph, params)), jax.tree.leaves(grads_of(unrolled_graph, params))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def untied_copy(cfg_rec, params_rec):
    """The untied 6-layer model whose layer l holds the shared block that depth l runs."""
    cfg = config()
    graph, template = split(cfg)
    leaves = param_leaves(params_rec)
    block_of = recursion_map(6, cfg_rec.model.recursion.blocks, cfg_rec.model.recursion.pattern)

    def fill(path, _):
        name = ".".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))
        if not name.startswith("stacks."):
            return leaves[name]
        rest = name.split(".", 2)[2]
        return jnp.stack([leaves[f"stacks.0.{rest}"][block_of[layer]] for layer in range(6)])

    return graph, jax.tree_util.tree_map_with_path(fill, template)


def test_shared_gradients_equal_the_sum_of_per_depth_gradients_of_an_untied_copy():
    cfg = recursive("cycle", 3)
    graph, params = split(cfg)
    params = perturbed(params)
    untied_graph, untied = untied_copy(cfg, params)
    np.testing.assert_allclose(logits_of(graph, params), logits_of(untied_graph, untied), atol=1e-5)
    shared, per_depth = param_leaves(grads_of(graph, params)), param_leaves(grads_of(untied_graph, untied))
    for path, grad in shared.items():
        if path.startswith("stacks."):  # block b's gradient = sum over depths b, b+3
            np.testing.assert_allclose(grad, per_depth[path][:3] + per_depth[path][3:], atol=1e-6, rtol=1e-4)
        else:
            np.testing.assert_allclose(grad, per_depth[path], atol=1e-6, rtol=1e-4)


def test_conversion_inits_take_the_right_layers():
    assert block_sources(6, 3, "cycle", "stepwise") == {0: [0], 1: [2], 2: [5]}  # evenly spaced, ends included
    assert block_sources(6, 3, "sequence", "stepwise") == {0: [0], 1: [2], 2: [4]}  # first of each group
    assert block_sources(6, 3, "cycle", "average") == {0: [0, 3], 1: [1, 4], 2: [2, 5]}
    assert block_sources(6, 3, "sequence", "lower") == {0: [0], 1: [1], 2: [2]}
    assert block_sources(8, 2, "middle_cycle", "stepwise") == {0: [1], 1: [6]}
    src = config()
    _, params = split(src)
    params = perturbed(params)
    leaves = {k: np.asarray(v) for k, v in param_leaves(params).items()}
    out, _ = convert_params(leaves, src.model, recursive("cycle", 3).model, "average")
    for name in ("attn.wq", "mlp.w_out", "attn_norm.scale"):
        layers = leaves[f"stacks.0.blocks.{name}"]
        np.testing.assert_allclose(out[f"stacks.0.blocks.{name}"][1], (layers[1] + layers[4]) / 2, rtol=1e-6)


def test_full_rank_svd_relaxation_reproduces_the_untied_model_and_error_falls_with_rank():
    src = config()
    graph, params = split(src)  # norms at init: projections are the only per-layer difference
    leaves = {k: np.asarray(v) for k, v in param_leaves(params).items()}
    expected = logits_of(graph, params)
    errors = []
    for rank in (1, 4, 8, 16):
        dst = recursive_config(src, 3, "cycle", lora_rank=rank)
        converted, error = convert_params(leaves, src.model, dst.model, "stepwise")
        errors.append(error)
        if rank == 16:  # >= every projection's smaller side: exact
            dst_graph, template = split(dst)
            tree = jax.tree_util.tree_map_with_path(
                lambda path, _: jnp.asarray(converted[".".join(str(p.key) for p in path
                                                               if isinstance(p, jax.tree_util.DictKey))]), template)
            np.testing.assert_allclose(logits_of(dst_graph, tree), expected, atol=2e-5)
            assert max(error.values()) < 1e-5
    for name in errors[0]:
        assert all(a > b for a, b in zip([e[name] for e in errors], [e[name] for e in errors][1:])), name


@pytest.mark.parametrize("extra", [["model.recursion.lora_rank=2", "model.canon=ABCD"],
                                   ["model.recursion.pattern=middle_sequence", "model.norm=lns", "model.remat=full"]])
def test_cached_decoding_equals_the_full_forward(extra):
    from layerjax.generate import generate

    cfg = recursive("cycle", 2, *extra)
    graph, params = split(cfg)
    params = perturbed(params)
    tokens, logits = generate(graph, params, TOKENS[:, :4], 6)
    full = nnx.merge(graph, params)(tokens)[0]
    np.testing.assert_allclose(logits, full[:, 3:9], atol=2e-5)
    # An early exit decodes from the stream after its depth, here with the later layers never run.
    _, exit_logits = generate(graph, params, TOKENS[:, :4], 3, exit_depth=4)
    _, _, hidden = nnx.merge(graph, params).forward(tokens[:, :6], probe="hidden")
    np.testing.assert_allclose(exit_logits, nnx.merge(graph, params).head_logits(hidden[4])[:, 3:6], atol=2e-5)


def test_early_exit_losses_are_reported_and_weighted_by_their_formula():
    from multiprocess_worker import fixed_batches
    from layerjax.train.step import _weighted_sums, token_losses

    cfg = recursive("cycle", 2, "model.recursion.exits=loops", "model.recursion.exit_weights=0.5")
    assert cfg.model.recursion.exits == ("loops",)
    graph, params = split(cfg)
    params = perturbed(params)
    batch = {k: jnp.asarray(v) for k, v in next(fixed_batches(cfg, 48, 1)).items()}
    ce, _, _, _, exits = token_losses(graph, params, batch)
    assert exits["ce"].shape == (2, 4, 16)  # after loops 1 and 2 of 3: depths 2 and 4
    _, _, hidden = nnx.merge(graph, params).forward(batch["inputs"], probe="hidden")
    model = nnx.merge(graph, params)
    for i, depth in enumerate((2, 4)):
        logits = model.head_logits(hidden[depth])
        manual = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        np.testing.assert_allclose(exits["ce"][i], manual, atol=1e-5)
    total, stats = _weighted_sums(graph, params, batch, cfg)
    n = jnp.sum(batch["weights"])
    expected = (jnp.sum(ce) + 0.5 * jnp.sum(exits["ce"][0]) + 0.5 * jnp.sum(exits["ce"][1])) / 2.0
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    assert stats["exit_ce_sums"].shape == (2,) and float(n) == 64


def test_program_size_does_not_grow_with_loops():
    """Compile time flat in R: the compiled step for 8 loops is the same program as for 1 loop
    (one scan body taking its block by index); only the loop count differs."""
    def hlo_ops(loops):
        # One layer per iteration: model.scan_unroll=auto would unroll the 2-layer model on CPU.
        cfg = load_config(None, [*BASE, f"model.num_layers={2 * loops}", "model.recursion.blocks=2",
                                 "model.scan_unroll=1"])
        graph, params = split(cfg)
        step = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graph, p)(TOKENS)[0] ** 2)))
        text = step.lower(params).compile().as_text()
        return sum(1 for line in text.splitlines() if " = " in line)

    one, eight = hlo_ops(1), hlo_ops(8)
    assert eight <= 1.05 * one, (one, eight)


@pytest.mark.parametrize("overrides, message", [
    (["model.recursion.blocks=4"], "must divide model.num_layers = 6"),
    (["model.recursion.blocks=3", "model.recursion.pattern=middle_cycle"], "num_layers - 2"),
    (["model.recursion.lora_rank=4"], "need shared blocks"),
    (["model.recursion.blocks=3", "model.norm=mix", "model.mix_alpha=0.5"], "share blocks but their layers differ"),
    (["model.recursion.blocks=3", "model.recursion.exits=6"], "between 1 and model.num_layers - 1"),
    (["model.recursion.blocks=3", "model.recursion.exits=loops", "model.recursion.exit_weights=1,2"], "one weight per exit"),
    (["model.recursion.blocks=3", "model.recursion.pattern=sequence", "model.recursion.exits=loops"], "cycle pattern"),
])
def test_recursion_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_to_recursive_writes_a_run_directory_that_trains_and_samples(tmp_path, capsys):
    import importlib
    import pathlib
    import sys

    from layerjax.train.loop import train
    from layerjax.train.metrics import read_metrics

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    run = ["data.source=synthetic_random", "data.synthetic_vocab=48", "train.log_every=1", "logging.progress=false",
           "logging.tensorboard=false", "checkpoint.async_save=false"]
    train(config(*run, f"train.run_dir={tmp_path / 'base'}", "train.steps=2", "train.eval_every=0"))
    tool = importlib.import_module("to_recursive")
    report = tool.main([str(tmp_path / "base"), "--out", str(tmp_path / "rec"), "--blocks", "3", "--init", "average",
                        "--lora-rank", "4"])
    assert report["params_after"] < report["params_before"] and "relative error" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already shares blocks"):
        tool.main([str(tmp_path / "rec"), "--out", str(tmp_path / "again"), "--blocks", "1"])
    up = load_config(str(tmp_path / "rec" / "config.toml"),
                     [f"train.run_dir={tmp_path / 'up'}", "train.steps=2", "train.eval_every=2",
                      "model.recursion.exits=3", "checkpoint.every=0"])
    summary = train(up)
    assert summary["steps"] == 2 and "val_loss_exit3" in summary
    assert "loss_exit3" in read_metrics(tmp_path / "up", "train")[-1]
    importlib.import_module("sample").main([str(tmp_path / "up"), "--prompt", "x", "--max-new-tokens", "3",
                                            "--exit-depth", "3"])
    assert "generated:" in capsys.readouterr().out


def test_sharded_training_equals_one_device_and_bfloat16_runs():
    from multiprocess_worker import step_losses

    rec = ["model.recursion.blocks=3", "model.recursion.lora_rank=2", "model.recursion.exits=loops",
           "data.batch_size=8"]
    single = step_losses(config(*rec))
    sharded = step_losses(config(*rec, "mesh.num_devices=0", "mesh.rules=fsdp_tp", "mesh.shape=data:2,fsdp:2,tensor:2"))
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    half = step_losses(config(*rec, "model.dtype=bfloat16", "model.param_dtype=bfloat16"))
    assert np.all(np.isfinite(half)) and np.allclose(half, single, rtol=0.05)


def test_layer_diagnostics_and_export_know_shared_blocks():
    from layerjax.diagnostics.layers import make_layer_stats_step
    from layerjax.interop import UnsupportedModelError
    from layerjax.interop.families import export_family
    from multiprocess_worker import fixed_batches

    cfg = recursive("middle_cycle", 2, "model.recursion.lora_rank=2")
    graph, params = split(cfg)
    batch = {k: jnp.asarray(v) for k, v in next(fixed_batches(cfg, 48, 1)).items()}
    stats = jax.jit(make_layer_stats_step(graph, build_plan(cfg.model)))(perturbed(params), batch)
    assert stats["grad_norm"].shape == (6,) and np.all(np.asarray(stats["grad_norm"]) > 0)
    with pytest.raises(UnsupportedModelError, match="shared"):
        export_family(cfg.model)
