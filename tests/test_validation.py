"""Every bad input gets one clear line before anything compiles: out-of-range and non-finite
settings, overlapping per-layer norms, presets, tokenizer files, sizes that cannot fit in memory,
and the arguments of tools/sample.py and tools/ablate.py. Each message names the setting."""

import dataclasses
import functools
import pathlib
import sys
import time

import pytest

from conftest import TINY_RUN
from layerjax.ablation.grid import expand, parse_axes, parse_variants
from layerjax.config import Config, ConfigError, all_keys, load_config, to_toml
from layerjax.data.tokenizers import build_tokenizer
from layerjax.train.memory import check_fits, estimate_memory, param_counts, shortfall
from layerjax.train.state import build_setup, resolve_vocab

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import ablate  # noqa: E402
import sample  # noqa: E402


def refusal(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=-1e-3"], "optim.lr=-0.001 must be >= 0; e.g. the default optim.lr=0.003"),
    (["optim.b1=1"], "optim.b1=1.0 must be in [0, 1); e.g. the default optim.b1=0.9"),
    (["optim.b2=-0.5"], "optim.b2=-0.5 must be in [0, 1)"),
    (["optim.clip_norm=-1"], "optim.clip_norm=-1.0 must be >= 0"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5 must be >= 0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5 must be in [0, 1]"),
    (["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio=-0.1 must be in [0, 1]"),
    (["optim.decay_fraction=2"], "optim.decay_fraction=2.0 must be in [0, 1]"),
    (["train.max_skipped_fraction=1.5"], "train.max_skipped_fraction=1.5 must be in [0, 1]"),
    (["train.max_skipped_in_row=-1"], "train.max_skipped_in_row=-1 must be >= 0 (0 turns it off)"),
    (["train.eval_every=-1"], "train.eval_every=-1 must be >= 0 (0 turns it off)"),
    (["checkpoint.every=-200"], "checkpoint.every=-200 must be >= 0 (0 turns it off)"),
    (["logging.layer_stats_every=-1"], "logging.layer_stats_every=-1 must be >= 0 (0 turns it off)"),
    (["train.log_every=0"], "train.log_every=0 must be positive"),
    (["data.num_eval_batches=0"], "train.eval_every=200 evaluates on data.num_eval_batches=0 batches; set "
                                  "data.num_eval_batches >= 1, or train.eval_every=0"),
    (["data.num_eval_batches=-1"], "data.num_eval_batches=-1 must be >= 0"),
    (["model.init_std=-0.02"], "model.init_std=-0.02 must be >= 0"),
    (["train.z_loss=-1e-4"], "train.z_loss=-0.0001 must be >= 0"),
    (["model.norm_eps=-1e-6"], "model.norm_eps=-1e-06 must be >= 0"),
    (["model.adapter.balance_loss=-1"], "model.adapter.balance_loss=-1.0 must be >= 0"),
    (["model.rope_theta=0"], "model.rope_theta=0.0 must be positive; e.g. the default model.rope_theta=10000.0"),
    (["model.rope_theta=-10000"], "model.rope_theta=-10000.0 must be positive"),
    (["data.val_fraction=1"], "data.val_fraction=1.0 must be in [0, 1)"),
    (["train.run_dir="], "train.run_dir is empty, which would write the run into the current directory"),
    (["train.run_dir=  "], "train.run_dir is empty"),
    (["model.num_layers=6", "model.layer_norms=0-3:post,2-5:peri"],
     "model.layer_norms entries '0-3:post' and '2-5:peri' both set layer 2: give each layer one scheme"),
    (["model.layer_norms=1:post,1:peri"], "model.layer_norms entries '1:post' and '1:peri' both set layer 1"),
])
def test_out_of_range_settings_are_refused_by_name(overrides, message):
    assert message in refusal(overrides)


FLOAT_KEYS = [k for k in all_keys() if isinstance(functools.reduce(getattr, k.split("."), Config()), float)]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(key, value):
    message = refusal([f"{key}={value}"])
    assert message.startswith(f"{key}={float(value)} is not a finite number; e.g. the default {key}=")


def test_edge_values_that_mean_off_or_zero_are_accepted():
    cfg = load_config("default", ["optim.lr=0", "optim.b1=0", "optim.clip_norm=0", "optim.warmup_steps=0",
                                  "train.eval_every=0", "data.num_eval_batches=0", "checkpoint.every=0",
                                  "optim.min_lr_ratio=1", "model.layer_norms=0-1:post,2-3:peri"])
    assert cfg.optim.lr == 0 and cfg.data.num_eval_batches == 0


@pytest.mark.parametrize("extends", ["3", '["default"]', '""', "true"])
def test_preset_extends_must_be_one_name(tmp_path, extends):
    preset = tmp_path / "child.toml"
    preset.write_text(f"extends = {extends}\n[model]\nnum_layers = 2\n")
    with pytest.raises(ConfigError, match=r"child\.toml: extends=.* must name one preset or \.toml path as a "
                                          r"string, e.g. extends = \"default\""):
        load_config(str(preset))


@pytest.mark.parametrize("content, reason", [
    ('{"hello": "world"}', 'is JSON but not a tokenizer (it has no "model" object)'),
    ("[1, 2, 3]", "is JSON but not a tokenizer"),
    ("this is not json", "is not JSON at line 1"),
    (b"\xff\xfe\x00binary", "is not JSON"),
])
def test_a_tokenizer_json_that_is_not_a_tokenizer_names_the_file_and_setting(tmp_path, content, reason):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    data = dataclasses.replace(Config().data, tokenizer=str(path))
    with pytest.raises(ConfigError) as err:
        build_tokenizer(data)
    message = str(err.value)
    assert message.startswith(f"data.tokenizer={str(path)!r} ") and reason in message and "\n" not in message
    assert message.endswith("or data.tokenizer=byte")


def test_a_tokenizer_json_the_library_rejects_is_one_line(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE"}}')  # the shape of a tokenizer, without its vocabulary
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*is not a tokenizer the Hugging Face tokenizers "
                                          r"library can load \(.+\); give the tokenizer\.json"):
        build_tokenizer(dataclasses.replace(Config().data, tokenizer=str(path)))


# ---------------------------------------------------------------- memory


def test_a_model_too_large_for_memory_is_refused_in_milliseconds():
    cfg = load_config("default", ["model.d_model=262144"])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_fits(cfg)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert message.startswith("model.d_model=262144 x model.num_layers=4 needs about ") and "\n" not in message
    assert " TiB per device (params " in message and "memory: use a smaller model" in message
    assert "mesh.rules=fsdp" in message


def test_the_default_config_fits_and_its_estimate_counts_the_real_parameters():
    cfg = resolve_vocab(load_config("default"), 41)
    estimate = check_fits(cfg)
    assert 0 < estimate.params and 0 < estimate.activations
    for overrides in ([], ["model.tie_embeddings=false", "model.positions=learned", "model.canon=ABCD"],
                      ["model.num_layers=6", "model.recursion.blocks=3"], ["model.adapter.kind=mola"]):
        cfg = resolve_vocab(load_config("default", [*overrides, "mesh.num_devices=1"]), 41)
        setup = build_setup(cfg)
        assert sum(param_counts(cfg.model)) == setup.num_params, overrides


def test_sharding_divides_the_state_and_activations_suggest_their_fixes():
    dp = resolve_vocab(load_config("default", ["mesh.rules=dp"]), 41)
    fsdp = dataclasses.replace(dp, mesh=dataclasses.replace(dp.mesh, rules="fsdp"))
    assert estimate_memory(fsdp, 8).params * 8 == pytest.approx(estimate_memory(dp, 8).params, rel=0.01)
    # On an accelerator the limit is per device; activations dominate here, so the fixes are batch and remat.
    big_batch = resolve_vocab(load_config("default", ["data.batch_size=4096"]), 41)
    problem = shortfall(big_batch, estimate_memory(big_batch, 1), (2**20, "test memory"), "gpu")
    assert problem.startswith("that is more than the 1.0 MiB of test memory: lower data.batch_size")
    assert problem.endswith("or set model.remat=full")
    assert shortfall(big_batch, estimate_memory(big_batch, 1), None, "gpu") is None


def temp_bytes_of_gradient(scan: bool, remat: str) -> int:
    """XLA temp bytes of a 2-layer model's gradient, compiled for this (CPU) backend."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from layerjax.model.transformer import Transformer

    m = dataclasses.replace(load_config("default").model, vocab_size=41, num_layers=2, max_seq_len=64, canon="",
                            scan_layers=scan, scan_unroll=1, remat=remat)
    graph, params = nnx.split(Transformer(m, nnx.Rngs(0)))
    loss = lambda params, tokens: jnp.mean(nnx.merge(graph, params)(tokens)[0])
    tokens = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_unrolled_layers_on_cpu_keep_every_activation_and_the_estimate_knows():
    """XLA:CPU merges a remat's recomputation back into the forward pass when layers are not
    scanned, so remat=full keeps what none keeps; the estimate counts them so, and the fix it
    suggests is the scan, not a remat policy that does nothing there."""
    import jax

    if jax.devices()[0].platform != "cpu":
        pytest.skip("a property of XLA:CPU")
    assert temp_bytes_of_gradient(scan=False, remat="full") > 1.4 * temp_bytes_of_gradient(scan=True, remat="full")
    scanned = resolve_vocab(load_config("default", ["model.remat=full", "model.scan_unroll=1"]), 41)
    unrolled = dataclasses.replace(scanned, model=dataclasses.replace(scanned.model, scan_layers=False))
    keep_all = dataclasses.replace(scanned, model=dataclasses.replace(scanned.model, remat="none"))
    assert estimate_memory(unrolled, 1).activations == estimate_memory(keep_all, 1).activations
    assert estimate_memory(scanned, 1).activations < estimate_memory(keep_all, 1).activations / 2
    big = lambda cfg: dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=4096))
    on_cpu = shortfall(big(unrolled), estimate_memory(big(unrolled), 1), (2**20, "test memory"), "cpu")
    assert on_cpu.endswith("or set model.scan_layers=true (unrolled layers on CPU keep every activation "
                           "whatever model.remat)")
    # Elsewhere the estimate counts the remat policy unrolled too (not measured on an accelerator here).
    on_gpu = shortfall(big(unrolled), estimate_memory(big(unrolled), 1), (2**20, "test memory"), "gpu")
    assert "scan_layers" not in on_gpu
    # model.scan_unroll=auto unrolls up to 12 layers on CPU only; the fix it names is the loop.
    auto = dataclasses.replace(scanned, model=dataclasses.replace(scanned.model, scan_unroll="auto"))
    assert estimate_memory(auto, 1, "cpu").activations == estimate_memory(keep_all, 1).activations
    assert estimate_memory(auto, 1, "gpu").activations == estimate_memory(scanned, 1, "gpu").activations
    assert shortfall(big(auto), estimate_memory(big(auto), 1), (2**20, "test memory"), "cpu").endswith(
        "or set model.scan_unroll=1 (unrolled layers on CPU keep every activation whatever model.remat)")


def test_dry_run_shows_the_memory_estimate():
    from layerjax.dryrun import dry_run_report

    report = dry_run_report(load_config("default", TINY_RUN))
    line = next(line for line in report.splitlines() if line.startswith("memory estimate"))
    assert "per device (params" in line and "fits in the" in line


# ---------------------------------------------------------------- tools


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "sample: --top-p 0.0 must be in (0, 1]"),
    (["--top-p", "1.5"], "sample: --top-p 1.5 must be in (0, 1]"),
    (["--temperature", "-1"], "sample: --temperature -1.0 must be >= 0 (0: greedy)"),
    (["--temperature", "nan"], "sample: --temperature nan must be >= 0"),
    (["--max-new-tokens", "0"], "sample: --max-new-tokens 0 must be at least 1"),
    (["--top-k", "-1"], "sample: --top-k -1 must be >= 0"),
])
def test_sample_refuses_bad_arguments_before_loading(tmp_path, args, message):
    (tmp_path / "config.toml").write_text("not even read")
    with pytest.raises(SystemExit) as exit_:
        sample.main([str(tmp_path), *args])
    assert str(exit_.value).startswith(message)


def test_sample_without_a_run_or_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^sample: .*missing is not a layerjax run directory \(it has no "
                                         r"config.toml\); give a run's train.run_dir$"):
        sample.main([str(tmp_path / "missing")])
    (tmp_path / "config.toml").write_text(to_toml(resolve_vocab(load_config("default", TINY_RUN), 41)))
    with pytest.raises(SystemExit, match=r"^sample: no checkpoint in "):
        sample.main([str(tmp_path)])


def test_grid_axis_values_must_be_distinct():
    with pytest.raises(ConfigError, match=r"--grid model\.norm lists \['pre'\] more than once"):
        parse_axes(["model.norm=pre,post,pre"])


def test_cell_names_cannot_leave_the_ablation_folder(tmp_path):
    cells = expand("default", parse_axes(["train.init_from=../../escape,/abs/path,a b"]), [], tmp_path)
    assert [c.name for c in cells] == ["init_from=.._.._escape", "init_from=_abs_path", "init_from=a_b"]
    for cell in cells:
        run_dir = pathlib.Path(cell.config.train.run_dir).resolve()
        assert run_dir.parent == (tmp_path / "cells").resolve()
    long = expand("default", parse_axes(["train.init_from=" + "x" * 300]), [], tmp_path)[0]
    assert len(long.name) <= 120
    with pytest.raises(ConfigError, match=r"grid cells \['a/b'\] and \['a_b'\] would share the directory "
                                          r"cells/init_from=a_b"):
        expand("default", parse_axes(["train.init_from=a/b,a_b"]), [], tmp_path)


@pytest.mark.parametrize("args", [["--grid", "train.run_dir=../../escape,b"], ["--set", "train.run_dir=../x"],
                                  ["--variant", "v=train.run_dir=/tmp/x"]])
def test_ablate_refuses_to_move_cell_directories(tmp_path, args):
    with pytest.raises(SystemExit, match=r"config error: .* sets train\.run_dir, but every cell runs in "
                                         r"<out>/cells/<cell name>; choose where the grid goes with --out"):
        ablate.main([*args, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--variant v sets train.run_dir"):
        expand("default", [], [], tmp_path, parse_variants(["v=train.run_dir=/tmp/x"]))
