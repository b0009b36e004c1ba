"""The command-line surface: --print-config, --dry-run, tools/bench.py, generation and
tools/sample.py on a real (tiny) run."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FAST_COMPILE, TINY_RUN
from layerjax.config import load_config
from layerjax.generate import filter_logits, generate
from layerjax.model.transformer import Transformer
from layerjax.train.loop import train

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = TINY_RUN


def load_tool(name: str):
    """tools/<name>.py as a module, loaded by its path (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"layerjax_tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"})


def test_print_config_is_loadable_toml(tmp_path):
    out = run_cli("train.py", "--print-config", "model.num_layers=3")
    assert out.returncode == 0, out.stderr
    path = tmp_path / "c.toml"
    path.write_text(out.stdout)
    assert load_config(str(path)).model.num_layers == 3


def test_dry_run_prints_plan_params_flops_and_sharding():
    out = run_cli("train.py", "--dry-run", "model.layer_norms=0-1:post", "mesh.rules=fsdp")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "parameters" in text and "FLOPs per token" in text
    assert "4 layers in 2 scanned segment(s)" in text
    plan_rows = [line for line in text.splitlines() if line[:1].isdigit() and "(layers" in line]
    assert len(plan_rows) == 4 and "post" in plan_rows[0] and "pre" in plan_rows[3]
    assert "stacks/0/blocks/attn/wq" in text and "P(None, 'fsdp', None, None)" in text
    assert "'fsdp': 8" in text


def test_bench_reports_every_measure(tmp_path):
    bench = load_tool("bench")

    out = tmp_path / "bench.json"
    result = bench.main(["-c", "default", *TINY, "model.vocab_size=64", "--steps", "2", "--warmup", "1",
                         "--json", str(out)])
    for key in ("compile_s", "step_s_median", "tokens_per_s", "flops_per_token", "mfu", "peak_flops",
                "peak_host_memory_mib", "xla_temp_mib"):
        assert key in result and result[key] > 0, key
    assert result["tokens_per_s"] == pytest.approx(8 * 64 / result["step_s_median"])
    assert json.loads(out.read_text())["mfu"] == result["mfu"]


def test_bench_versus_times_each_variant_against_the_config_in_one_process(capsys):
    bench = load_tool("bench")
    base = ["-c", "default", *TINY, "model.vocab_size=64"]
    result = bench.main([*base, "--versus", "data.batch_size=16", "--rounds", "2", "--steps", "1", "--warmup", "0"])
    assert list(result) == ["baseline", "data.batch_size=16", "baseline again"]
    assert result["baseline"]["ratio_median"] == result["baseline"]["ratio_min"] == 1.0
    doubled = result["data.batch_size=16"]  # the variant's overrides apply on top of the config's
    assert doubled["xla_temp_mib"] > result["baseline"]["xla_temp_mib"] and doubled["ratio_median"] > 0
    assert "| data.batch_size=16 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--versus 'model.remat=sometimes': config error: model.remat='sometimes'"):
        bench.main([*base, "--versus", "model.remat=sometimes", "--rounds", "1", "--steps", "1"])
    with pytest.raises(SystemExit):  # two different comparisons at once
        bench.main([*base, "--versus", "data.batch_size=16", "--compare-torch", "2"])


def test_greedy_generation_matches_full_forward():
    cfg = load_config("default", [*TINY, "model.vocab_size=50"]).model
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    prompt = jnp.array([[3, 7, 1, 9], [4, 4, 2, 8]], jnp.int32)
    tokens, logits = generate(graphdef, params, prompt, 6)
    full, _ = model(tokens)
    # each generated token is the argmax of the full forward at the previous position
    np.testing.assert_array_equal(tokens[:, 4:], jnp.argmax(full[:, 3:-1], -1))
    np.testing.assert_allclose(logits, full[:, 3:-1], rtol=1e-4, atol=1e-4)


def test_top_k_and_top_p_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, 1.0, top_k=2, top_p=1.0)
    assert np.isfinite(top2[0, :2]).all() and np.isinf(top2[0, 2:]).all()
    nucleus = filter_logits(logits, 1.0, top_k=0, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert np.isfinite(nucleus[0, :2]).all() and np.isinf(nucleus[0, 2:]).all()
    draws = jax.vmap(lambda k: jax.random.categorical(k, nucleus[0]))(jax.random.split(jax.random.key(0), 400))
    assert set(np.unique(draws).tolist()) == {0, 1}


def test_sample_tool_on_a_trained_run(tmp_path):
    train(load_config("default", [*TINY, "train.steps=4", "train.eval_every=0", f"train.run_dir={tmp_path}"]))
    out = run_cli("tools/sample.py", str(tmp_path), "--depo-sample", "1")
    assert out.returncode == 0, out.stderr
    assert "loaded" in out.stdout and "step 4" in out.stdout
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert "=>" in lines["prompt"] and lines["expected"].strip()


def test_compare_torch_gives_the_reference_the_same_shape():
    bench = load_tool("bench")

    cfg = load_config("bench_cpu")
    args = bench.torch_ref_args(cfg)
    assert dict(zip(args[::2], args[1::2])) == {"--layers": "6", "--width": "384", "--heads": "6", "--ff": "1536",
                                                "--vocab": "4096", "--seq": "256", "--batch": "8"}
    assert bench.reference_mismatches(cfg) == []  # bench_cpu is the reference's model
    assert bench.reference_mismatches(load_config("bench_cpu", ["model.mlp=swiglu", "model.canon=AC"])) == [
        "model.mlp='swiglu' (reference: 'gelu')", "model.canon='AC' (reference: '')"]


def test_compare_torch_alternates_and_pairs_its_rounds():
    bench = load_tool("bench")

    assert [bench.round_order(i)[0] for i in range(4)] == ["layerjax", "torch", "layerjax", "torch"]
    assert all(sorted(bench.round_order(i)) == ["layerjax", "torch"] for i in range(4))
    # Round 2 ran on a slow machine for both sides: the per-round ratios cancel that, the medians less so.
    result = bench.summarize_rounds([1000.0, 500.0, 1100.0], [1000.0, 400.0, 1000.0])
    assert result["ratio"] == pytest.approx(1000.0 / 1000.0)
    assert result["round_ratios"] == pytest.approx([1.0, 1.25, 1.1])
    assert result["round_ratio_median"] == pytest.approx(1.1)
    assert (result["round_ratio_min"], result["round_ratio_max"]) == pytest.approx((1.0, 1.25))
    assert result["rounds_at_least_1"] == 3


TINY_REFERENCE = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
                  "model.vocab_size=64", "model.max_seq_len=16", "data.synthetic_vocab=64", "data.seq_len=16",
                  "data.batch_size=2"]


def test_bench_parts_runs_each_part_s_whole_forward():
    """A part returns its forward's value beside the gradients, so XLA cannot drop the forward
    matmuls the backward does not read: the matmul part does the forward's FLOPs three times
    (forward, input and weight gradients), as PyTorch's eager part does (only 78% without)."""
    bench_parts = load_tool("bench_parts")
    t, w, ff = 16, 8, 32
    args = [jnp.ones(shape) for shape in [(t, w), (w, 3 * w), (w, w), (w, ff), (ff, w)]]
    forward_flops = 2 * t * (w * 3 * w + w * w + w * ff + ff * w)
    run = jax.jit(bench_parts.forward_backward(bench_parts.layer_matmuls))
    flops = run.lower(jnp.ones((t, 4 * w)), *args).compile().cost_analysis()["flops"]
    assert 3 * forward_flops <= flops < 3.1 * forward_flops


def test_bench_parts_times_every_part_on_both_sides():
    pytest.importorskip("torch")
    bench_parts = load_tool("bench_parts")

    if not bench_parts.TORCH_REF.is_file():
        pytest.skip("needs ../shared/bench/torch_ref.py")
    rows = bench_parts.main(["-c", "bench_cpu", *TINY_REFERENCE, "--rounds", "1", "--calls", "1"])
    assert [r["part"] for r in rows] == ["whole train step", "weight matmuls (4 per layer)", "attention", "LayerNorm",
                                         "GELU", "tied head + cross-entropy", "AdamW update (+ clip, norms, guard)"]
    assert [r["per_step"] for r in rows] == [1, 1, 1, 3, 1, 1, 1]  # one layer: two norms and the final one
    assert all(r["layerjax_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
    table = bench_parts.format_rows(rows)
    assert "| sum of the parts |" in table and "| the rest (whole step - parts) |" in table
    assert table.splitlines()[-1].startswith("| whole train step | 1 |")
    with pytest.raises(SystemExit, match="model.mlp='swiglu'"):
        bench_parts.main(["-c", "bench_cpu", *TINY_REFERENCE, "model.mlp=swiglu"])
