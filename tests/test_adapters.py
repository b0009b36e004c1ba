"""LoRA, MoLA and MoLE adapters: a fresh adapter changes nothing, routing and balance equations,
parameter counts per allocation, batched experts == a per-expert loop, only adapters train (the
base gets no gradient and no optimizer state), routers learn from the LM loss for k = 1 and 2,
LoRA merges into the base, and experts shard over the `expert` mesh axis."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import ConfigError, load_config
from layerjax.interop.mapping import param_leaves, path_name
from layerjax.layers.adapters import LowRankAdapter, balance_loss, routing_weights
from layerjax.model.merge import merge_lora, merged_config
from layerjax.model.transformer import Transformer
from layerjax.train.state import build_setup, init_state, jit_train_step
from layerjax.train.step import split_trainable
from multiprocess_worker import fixed_batches

D, F, L = 32, 64, 2
BASE = ["model.vocab_size=64", f"model.num_layers={L}", f"model.d_model={D}", f"model.d_ff={F}", "model.num_heads=4",
        "model.num_kv_heads=2", "model.canon=", "model.max_seq_len=16", "data.seq_len=16", "data.batch_size=8",
        "mesh.num_devices=1", "optim.warmup_steps=0", "optim.lr=1e-2"]
KINDS = {
    "lora": ["model.adapter.kind=lora"],
    "mola": ["model.adapter.kind=mola", "model.adapter.experts=2,4"],
    "mole": ["model.adapter.kind=mole", "model.adapter.experts=2,4", "model.adapter.targets=gate,up,down",
             "model.adapter.top_k=1"],
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)


def config(*overrides):
    return load_config(None, [*BASE, *overrides])


def base_params_of(cfg, params):
    """The adapted model's base weights, as the params of the same model without adapters."""
    base_cfg = dataclasses.replace(cfg.model, adapter=dataclasses.replace(cfg.model.adapter, kind="none"))
    graph, base = nnx.split(nnx.eval_shape(lambda: Transformer(base_cfg, nnx.Rngs(0))), nnx.Param)
    leaves = param_leaves(params)
    segments = sorted({int(p.split(".")[1]) for p in leaves if p.startswith("stacks.")})

    def base_leaf(path):  # the base is one segment; the adapted model has one per expert count
        name = path_name(path)
        if not name.startswith("stacks."):
            return leaves[name]
        rest = name.split(".", 2)[2]
        return jnp.concatenate([leaves[f"stacks.{s}.{rest}"] for s in segments])

    return graph, jax.tree_util.tree_map_with_path(lambda path, _: base_leaf(path), base)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_leave_the_base_model_unchanged(kind):
    cfg = config(*KINDS[kind])
    graph, params = nnx.split(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param)
    adapted = nnx.merge(graph, params)(TOKENS)[0]
    base_graph, base = base_params_of(cfg, params)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(nnx.merge(base_graph, base)(TOKENS)[0]))


def test_top_k_weights_sum_to_one_on_exactly_k_experts():
    logits = jax.random.normal(jax.random.key(0), (50, 6))
    for k in (1, 2, 3):
        weights, probs = routing_weights(logits, k)
        assert np.all(np.sum(np.asarray(weights) > 0, axis=-1) == k)
        if k > 1:
            np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, rtol=1e-6)
    # k = 1: the chosen expert is weighted by its probability (< 1), so the router can learn;
    # renormalising (MoLA's code) makes it exactly 1.
    weights, probs = routing_weights(logits, 1)
    np.testing.assert_allclose(np.max(weights, -1), np.max(probs, -1), rtol=1e-6)
    np.testing.assert_allclose(np.max(routing_weights(logits, 1, renormalize_top1=True)[0], -1), 1.0, rtol=1e-6)


def test_balance_loss_is_one_when_uniform_and_larger_under_collapse():
    experts = 4
    uniform = jnp.full(experts, 1 / experts)
    np.testing.assert_allclose(balance_loss(uniform, uniform), 1.0, rtol=1e-6)
    collapsed = jnp.asarray([1.0, 0, 0, 0])
    np.testing.assert_allclose(balance_loss(collapsed, collapsed), experts, rtol=1e-6)
    assert float(balance_loss(jnp.asarray([0.4, 0.3, 0.2, 0.1]), jnp.asarray([0.5, 0.3, 0.2, 0.0]))) > 1.0


def expected_trainable(counts, rank=8):
    """sum over layers and targeted projections of E (d_in r + r d_out) + d_in E (router)."""
    q, kv = D, 2 * (D // 4)  # 4 heads of 8; 2 kv heads
    shapes = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]
    return sum(e * (i * rank + rank * o) + i * e for e in counts for i, o in shapes)


def test_trainable_parameter_count_matches_the_formula_per_allocation():
    for pattern, counts in [("2,4,6,8", [2, 4, 6, 8]), ("8,6,4,2", [8, 6, 4, 2]), ("2", [2] * 4)]:
        cfg = config("model.num_layers=4", "model.adapter.kind=mola", f"model.adapter.experts={pattern}")
        trainable, _ = split_trainable(nnx.state(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param), cfg.model)
        assert sum(x.size for x in jax.tree.leaves(trainable)) == expected_trainable(counts), pattern
    plan = build_setup(config("model.num_layers=4", "model.adapter.kind=mola", "model.adapter.experts=2,4,6,8")).plan
    assert [s.spec.experts for s in plan.segments] == [2, 4, 6, 8]  # one scanned segment per count
    assert "experts" in plan.table()


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_flops_count_every_adapter_weight_once(kind):
    """FLOPs/MFU count each adapter and router weight in one matmul per token (all experts are
    computed, then gated), and a frozen base at 4N (no weight gradients) instead of 6N."""
    from layerjax.train.flops import adapter_matmul_params, flops_per_token, matmul_params

    cfg = config(*KINDS[kind])
    trainable, _ = split_trainable(nnx.state(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))), nnx.Param),
                                   cfg.model)
    assert adapter_matmul_params(cfg.model) == sum(x.size for x in jax.tree.leaves(trainable))
    base = config()
    assert adapter_matmul_params(base.model) == 0
    attention = flops_per_token(base.model, 16) - 6 * matmul_params(base.model)
    assert flops_per_token(cfg.model, 16) == pytest.approx(
        4 * matmul_params(base.model) + 6 * adapter_matmul_params(cfg.model) + attention)


def test_batched_experts_equal_a_loop_over_experts():
    adapter = LowRankAdapter(D, 24, rank=4, alpha=8.0, rslora=False, experts=3, top_k=2, renormalize_top1=False,
                             dropout=0.0, rngs=nnx.Rngs(0))
    adapter.b.value = jax.random.normal(jax.random.key(1), adapter.b.shape)
    x = jax.random.normal(jax.random.key(2), (10, D))
    weights, _ = routing_weights(x @ adapter.router.weight[...], 2)
    expected = sum(weights[:, e:e + 1] * 2.0 * (x @ adapter.a[:, e, :] @ adapter.b[e]) for e in range(3))
    np.testing.assert_allclose(adapter(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_changes_only_adapters_and_the_base_has_no_optimizer_state(kind):
    cfg = config(*KINDS[kind], "model.adapter.dropout=0.1")
    setup = build_setup(cfg)
    state = init_state(setup, 0)
    before = param_leaves(jax.device_get(state.params))
    batch = next(fixed_batches(cfg, 64, 1))
    state, metrics = jit_train_step(setup)(state, batch)
    after = param_leaves(jax.device_get(state.params))
    trainable, _ = split_trainable(state.params, cfg.model)
    trainable_paths = set(param_leaves(trainable))
    assert trainable_paths and all(".adapters." in p or ".router." in p for p in trainable_paths)
    for path in set(before) - trainable_paths:
        assert np.array_equal(before[path], after[path]), f"base parameter {path} changed"
    assert all(not np.array_equal(before[p], after[p]) for p in trainable_paths if p.endswith(".b"))
    # AdamW's two moments for the adapters only, plus scalar step counts: nothing for the base.
    trainable_size = sum(x.size for x in jax.tree.leaves(trainable))
    assert 2 * trainable_size <= sum(x.size for x in jax.tree.leaves(state.opt_state)) < 2 * trainable_size + 16
    if kind != "lora":
        assert "router_balance" in metrics and np.isfinite(float(metrics["router_balance"]))


@pytest.mark.parametrize("top_k, renormalize, learns", [(1, False, True), (2, False, True), (1, True, False)])
def test_routers_get_a_gradient_from_the_language_model_loss(top_k, renormalize, learns):
    from layerjax.train.step import _weighted_sums, join_trainable

    cfg = config("model.adapter.kind=mola", "model.adapter.experts=3", f"model.adapter.top_k={top_k}",
                 f"model.adapter.renormalize_top1={str(renormalize).lower()}", "model.adapter.dropout=0")
    graph, params = nnx.split(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param)
    # Trained adapters (B != 0): with B = 0 at init no expert's output can depend on its weight.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(path)), x.shape)
        if getattr(path[-2], "key", None) == "b" else x, params)
    trainable, frozen = split_trainable(params, cfg.model)
    batch = {k: jnp.asarray(v) for k, v in next(fixed_batches(cfg, 64, 1)).items()}
    grads, _ = jax.grad(lambda t: _weighted_sums(graph, join_trainable(t, frozen), batch, cfg), has_aux=True)(trainable)
    router_grads = [g for path, g in param_leaves(grads).items() if path.endswith("router.weight")]
    assert len(router_grads) == 7  # one per projection, stacked over the layers
    norms = [float(jnp.linalg.norm(g[layer])) for g in router_grads for layer in range(L)]
    # Renormalised top-1 weights are p / p: zero gradient up to float32 rounding.
    assert all(n > 1e-4 for n in norms) if learns else all(n < 1e-6 for n in norms)


def test_lora_merge_gives_the_same_logits():
    cfg = config("model.adapter.kind=lora")
    graph, params = nnx.split(Transformer(cfg.model, nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    merged = merge_lora(cfg.model, params)
    merged_graph, _ = nnx.split(nnx.eval_shape(lambda: Transformer(merged_config(cfg.model), nnx.Rngs(0))), nnx.Param)
    np.testing.assert_allclose(nnx.merge(merged_graph, merged)(TOKENS)[0], nnx.merge(graph, params)(TOKENS)[0],
                               atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot become one weight"):
        merge_lora(config(*KINDS["mola"]).model, params)


def test_expert_sharded_training_equals_one_device():
    from multiprocess_worker import step_losses

    single = step_losses(config(*KINDS["mola"], "model.adapter.dropout=0"))
    sharded = step_losses(config(*KINDS["mola"], "model.adapter.dropout=0", "mesh.num_devices=0",
                                 "mesh.rules=fsdp", "mesh.shape=data:4,expert:2"))
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


@pytest.mark.parametrize("overrides, message", [
    (["model.adapter.kind=mola", "model.adapter.experts=2,4,6"], "neither equals nor evenly divides"),
    (["model.adapter.kind=mola", "model.num_layers=4", "model.adapter.experts=2,4,6"], "neither equals nor evenly divides"),
    (["model.adapter.kind=mola", "model.adapter.experts=2,x"], "must be whole numbers"),
    (["model.adapter.kind=mola", "model.adapter.top_k=3", "model.adapter.experts=2,4"], "top_k=3 must be between 1"),
    (["model.adapter.kind=mole", "model.adapter.top_k=1"], "puts experts on the MLP only"),
    (["model.adapter.kind=lora", "model.adapter.dropout=1"], "dropout=1.0 must be in [0, 1)"),
    (["model.adapter.kind=moe"], "model.adapter.kind='moe' is not one of"),
])
def test_adapter_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config(*overrides)


def test_finetune_on_a_base_run_checkpoints_only_adapters_and_resumes_exactly(tmp_path):
    from layerjax.train.checkpoint import load_run
    from layerjax.train.loop import train
    from layerjax.train.metrics import read_metrics

    run = ["data.source=synthetic_random", "data.synthetic_vocab=64", "train.eval_every=0", "train.log_every=1",
           "logging.progress=false", "logging.tensorboard=false", "checkpoint.async_save=false"]
    train(config(*run, f"train.run_dir={tmp_path / 'base'}", "train.steps=2"))
    # Two projections suffice here (compile time): what is tested is the run directory's life cycle.
    finetune = [*run, *KINDS["mola"], "model.adapter.targets=q,down", f"train.init_from={tmp_path / 'base'}",
                "train.steps=4", "checkpoint.every=2"]
    train(config(*finetune, f"train.run_dir={tmp_path / 'full'}"))
    split = config(*finetune, f"train.run_dir={tmp_path / 'split'}")
    train(split, stop_at_step=2)
    train(split)
    losses = lambda name: [row["loss"] for row in read_metrics(tmp_path / name, "train")]
    assert len(losses("split")) == 4
    np.testing.assert_array_equal(losses("split"), losses("full"))

    assert json.loads((tmp_path / "split" / "base.json").read_text())["step"] == 2
    usage = read_metrics(tmp_path / "split", "router")[-1]["expert_usage"]
    assert [len(u) for u in usage] == [2, 4] and np.allclose([sum(u) for u in usage], 1.0, atol=1e-5)
    assert (tmp_path / "split" / "experts.png").read_bytes()[:4] == b"\x89PNG"
    import orbax.checkpoint as ocp

    saved = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(
        tmp_path / "split" / "checkpoints" / "4" / "state").item_metadata.tree["params"]
    saved_paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
    assert saved_paths and all(".adapters." in p for p in saved_paths)  # never the base
    _, _, base, _ = load_run(tmp_path / "base")
    _, _, tuned, _ = load_run(tmp_path / "split")
    base_leaves, tuned_leaves = param_leaves(base), param_leaves(tuned)
    np.testing.assert_array_equal(tuned_leaves["embed.table"], base_leaves["embed.table"])
    np.testing.assert_array_equal(  # layer 1 sits in the second (4-expert) segment of the fine-tune
        tuned_leaves["stacks.1.blocks.attn.wq"][0], base_leaves["stacks.0.blocks.attn.wq"][1])
    with pytest.raises(ConfigError, match="is a different model: model.d_model"):
        train(config(*finetune, "model.d_model=64", f"train.run_dir={tmp_path / 'wrong'}"))


def test_lora_fine_tune_exports_merged_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from layerjax.config import to_toml
    from layerjax.interop import UnsupportedModelError, export_hf
    from layerjax.train.checkpoint import Checkpointer, load_run
    from layerjax.train.loop import train

    run = ["data.source=synthetic_random", "data.synthetic_vocab=64", "train.eval_every=0", "logging.progress=false",
           "logging.tensorboard=false", "checkpoint.async_save=false", "model.init_std=0.2"]
    base_cfg = config(*run, f"train.run_dir={tmp_path / 'base'}")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.toml").write_text(to_toml(base_cfg))
    checkpointer = Checkpointer(tmp_path / "base", base_cfg.checkpoint)
    checkpointer.save(0, init_state(build_setup(base_cfg), 0), {})
    checkpointer.close()
    tuned = config(*run, "model.adapter.kind=lora", "model.adapter.targets=q,o,up,down", "optim.lr=0.05",
                   f"train.init_from={tmp_path / 'base'}", f"train.run_dir={tmp_path / 'lora'}", "train.steps=2")
    train(tuned)
    assert export_hf(tmp_path / "lora", tmp_path / "out")["family"] == "llama"
    cfg, setup, params, _ = load_run(tmp_path / "lora")
    ours = nnx.merge(setup.graphdef, params)(TOKENS)[0]  # base + unmerged adapters
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = reloaded(torch.from_numpy(np.array(TOKENS)).long()).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    base_logits = nnx.merge(*base_params_of(cfg, params))(TOKENS)[0]
    assert np.abs(np.asarray(ours) - np.asarray(base_logits)).max() > 1e-3  # the adapters did change it
    with pytest.raises(UnsupportedModelError, match="a mixture of LoRA experts routes by input"):
        (tmp_path / "mola").mkdir()
        (tmp_path / "mola" / "config.toml").write_text(to_toml(config(*KINDS["mola"])))
        export_hf(tmp_path / "mola", tmp_path / "out2")


def test_a_short_fine_tune_beats_the_frozen_base_on_a_generated_task(tmp_path):
    """LoRA on a frozen random base learns to copy one letter of four (chance 0.25) in 150 steps;
    the frozen base itself (step 0: fresh adapters change nothing) gets none right. At lr 3e-3 it
    gets all right whether the layers are scanned or unrolled, with or without remat; at 1e-2 the
    float32 rounding of those variants (gradients equal to 7e-7) moved it between 0.16 and 0.84."""
    from layerjax.data.sft_tasks import make_records
    from layerjax.train.loop import train
    from layerjax.train.metrics import read_metrics

    records = make_records("copy", 2000, seed=0, settings={"copy": {"min_len": 1, "max_len": 1, "alphabet": 4}})
    (tmp_path / "copy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(None, [
        "model.num_layers=2", "model.d_model=64", "model.num_heads=2", "model.canon=", "model.max_seq_len=64",
        "data.source=sft", f"data.paths={tmp_path / 'copy.jsonl'}", "data.seq_len=64", "data.batch_size=16",
        "data.val_fraction=0.05", "data.num_eval_batches=2", "model.adapter.kind=lora", "model.adapter.dropout=0",
        "optim.lr=3e-3", "optim.warmup_steps=0", "train.steps=150", "train.eval_every=150", "train.log_every=50",
        "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false", "mesh.num_devices=1",
        f"train.run_dir={tmp_path / 'run'}"])
    train(cfg)
    before, after = (row["accuracy"] for row in read_metrics(tmp_path / "run", "eval"))
    assert before <= 0.05 and after >= 0.9, (before, after)
