#!/usr/bin/env python
"""Benchmark the train step of any config:

    python tools/bench.py [-c PRESET] [section.field=value ...] [--steps N] [--warmup N] [--json FILE]

Measures, on random tokens of the config's batch shape (the data pipeline is not timed):
- compile time: lowering + XLA compilation of the jitted train step;
- median step time over `--steps` steps after `--warmup` steps, and tokens/s;
- model FLOPs per token = 6*N + 12*L*H*K*T, where N counts the parameters used in matmuls (all
  layer weights plus the output head; embedding lookups excluded), L layers, H heads of size K,
  T the sequence length (attention counted without causal halving, the PaLM convention);
- MFU = FLOPs per token * tokens/s / peak, where peak is a float32 [2048x2048] matmul probe timed
  in the same run on the same devices (or `--peak-flops`);
- per-device memory: parameters and optimizer state as the shardings place them, and XLA's memory
  analysis of the compiled step (arguments, outputs, temporaries = activations), and the process's
  peak host memory (max RSS).
`--steps 0` compiles against the state's shapes only and reports compile time and memory: how to
size a config too big to run here.

`--versus OVERRIDES` (repeatable) times variants of the config against it in one process, in
alternating rounds, and reports each one's per-round step-time ratio to the config's, with a
second copy of the config as the noise floor: the paired A/B behind the README's performance
decisions, e.g. `tools/bench.py -c bench_cpu --versus model.scan_unroll=1 --rounds 10 --steps 3`.
`--compare-torch` runs the PyTorch reference beside it instead.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import sys
import time

if __name__ == "__main__":
    from layerjax.allocator import use_tcmalloc

    use_tcmalloc()  # before jax is imported: re-executes under tcmalloc where installed

import jax  # noqa: E402
import numpy as np  # noqa: E402

from layerjax.allocator import current_allocator  # noqa: E402
from layerjax.cli import add_config_args, config_from_args  # noqa: E402
from layerjax.config import ConfigError, load_config  # noqa: E402
from layerjax.layers.matmul_cpu import resolve_matmul_impl  # noqa: E402
from layerjax.train.flops import flops_per_token, measure_peak_flops  # noqa: E402
from layerjax.sharding import per_device_bytes  # noqa: E402
from layerjax.train.state import build_setup, init_state, jit_train_step, resolve_vocab  # noqa: E402


def random_batch(cfg, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    return {"inputs": rng.integers(0, vocab, shape, dtype=np.int32),
            "targets": rng.integers(0, vocab, shape, dtype=np.int32),
            "weights": np.ones(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


def compiled_step(cfg, with_state: bool = True):
    """(cfg with its vocabulary resolved, setup, compiled train step, state, batch, compile seconds)
    for a config, on random tokens. with_state=False compiles against the state's shapes alone:
    nothing the size of the model is allocated."""
    vocab = cfg.model.vocab_size or cfg.data.synthetic_vocab
    cfg = resolve_vocab(cfg, vocab)
    setup = build_setup(cfg)
    state = init_state(setup, cfg.train.seed) if with_state else setup.abstract_state
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in random_batch(cfg, vocab).items()}
    start = time.perf_counter()
    compiled = jit_train_step(setup).lower(state, batch).compile()
    return cfg, setup, compiled, state, batch, time.perf_counter() - start


def bench(cfg, steps: int = 10, warmup: int = 2, peak_flops: float | None = None) -> dict:
    cfg, setup, compiled, state, batch, compile_s = compiled_step(cfg, with_state=steps > 0)
    result = {
        "config": f"{cfg.model.num_layers}L d{cfg.model.d_model} h{cfg.model.num_heads} "
                  f"ff{cfg.model.d_ff} v{cfg.model.vocab_size} seq{cfg.data.seq_len} b{cfg.data.batch_size} "
                  f"{cfg.model.dtype} {cfg.model.norm}-{cfg.model.norm_type} {cfg.model.mlp} "
                  f"scan={cfg.model.scan_layers} remat={cfg.model.remat}",
        # model.matmul_impl resolved: "auto" is mkl only where the layerjax[mkl] extra is installed
        "matmul": resolve_matmul_impl(cfg.model),
        "devices": f"{setup.mesh.size} x {jax.devices()[0].device_kind}",
        "params": setup.num_params,
        "compile_s": compile_s,
        # layerjax/allocator.py: glibc's malloc costs bench_cpu ~15% in page faults
        "allocator": current_allocator(),
    }
    if steps > 0:  # --steps 0: compile time and memory only
        result.update(_time_steps(cfg, setup, compiled, state, batch, steps, warmup, peak_flops))
    memory = compiled.memory_analysis()
    # Per device: what the shardings place on each device, then what XLA reports for the compiled
    # step (arguments = state + batch; temp = activations and other temporaries).
    result["mesh"] = ", ".join(f"{axis}={size}" for axis, size in setup.mesh.shape.items() if size > 1) or "1 device"
    result["per_device_params_mib"] = per_device_bytes(setup.abstract_state.params, setup.state_shardings.params) / 2**20
    result["per_device_opt_state_mib"] = per_device_bytes(setup.abstract_state.opt_state,
                                                          setup.state_shardings.opt_state) / 2**20
    if memory is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
            value = getattr(memory, name, None)
            if value is not None:
                result[f"xla_{name.replace('_size_in_bytes', '')}_mib"] = value / 2**20
    return result


def _time_steps(cfg, setup, compiled, state, batch, steps: int, warmup: int, peak_flops: float | None) -> dict:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    on_cpu = jax.devices()[0].platform == "cpu"
    peak = peak_flops or measure_peak_flops(dtype=cfg.model.dtype) * (1 if on_cpu else setup.mesh.size)
    return {"step_s_median": step_s, "tokens_per_s": tokens / step_s, "flops_per_token": fpt,
            "achieved_flops": fpt * tokens / step_s, "peak_flops": peak, "mfu": fpt * tokens / step_s / peak,
            "loss": float(metrics["loss"]),
            "peak_host_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def format_table(result: dict) -> str:
    def show(v):
        if isinstance(v, float):
            return f"{v:.3e}" if abs(v) >= 1e6 else f"{v:.3f}"
        return str(v)

    return "\n".join(f"{k:<24} {show(v)}" for k, v in result.items())


TORCH_REF = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "torch_ref.py"


def torch_ref_args(cfg) -> list[str]:
    """torch_ref.py's flags for the shape of `cfg` (its model is fixed: learned positions, Pre-LN
    LayerNorm, GELU MLP, tied embeddings, multi-head attention)."""
    from layerjax.config import d_ff

    m, d = cfg.model, cfg.data
    return ["--layers", str(m.num_layers), "--width", str(m.d_model), "--heads", str(m.num_heads),
            "--ff", str(d_ff(m)), "--vocab", str(m.vocab_size or d.synthetic_vocab), "--seq", str(d.seq_len),
            "--batch", str(d.batch_size)]


def reference_mismatches(cfg) -> list[str]:
    """Where the config's architecture differs from torch_ref.py's (the ratio then compares
    different models)."""
    m = cfg.model
    wanted = {"positions": "learned", "norm_type": "layer", "norm": "pre", "mlp": "gelu", "tie_embeddings": True,
              "canon": "", "num_kv_heads": 0, "dtype": "float32"}
    return [f"model.{k}={getattr(m, k)!r} (reference: {v!r})" for k, v in wanted.items()
            if hasattr(m, k) and getattr(m, k) != v and not (k == "num_kv_heads" and getattr(m, k) == m.num_heads)]


def round_order(i: int) -> tuple[str, str]:
    """Which side runs first in round i: they swap every round (ABBA), so a machine that speeds up
    or slows down across a round does not always favour the side that runs second."""
    return ("layerjax", "torch") if i % 2 == 0 else ("torch", "layerjax")


def summarize_rounds(ours: list[float], theirs: list[float]) -> dict:
    """The ratio (layerjax / PyTorch tokens/s) two ways: of the two medians, and per round (each
    round's two runs are neighbours in time, so their ratio cancels most of the machine's slow
    drift), with the per-round spread and how many rounds reach 1.0."""
    per_round = [o / t for o, t in zip(ours, theirs)]
    return {"layerjax_tokens_per_sec": ours, "torch_tokens_per_sec": theirs,
            "layerjax_median": statistics.median(ours), "torch_median": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs),
            "round_ratios": per_round, "round_ratio_median": statistics.median(per_round),
            "round_ratio_min": min(per_round), "round_ratio_max": max(per_round),
            "rounds_at_least_1": sum(r >= 1.0 for r in per_round)}


def compare_torch(args, rounds: int) -> dict:
    """Runs tools/bench.py and torch_ref.py in turn, `rounds` times each in fresh processes on the
    same shape (which side goes first alternates), and reports the median tokens/s of each, the
    ratio of the medians, and the median and range of the per-round ratios."""
    import subprocess
    import tempfile

    cfg = config_from_args(args)
    if not TORCH_REF.is_file():
        sys.exit(f"bench: --compare-torch needs {TORCH_REF} (the PyTorch reference); it is not there")
    print(f"both sides run under the {current_allocator()} allocator (layerjax/allocator.py)", flush=True)
    for mismatch in reference_mismatches(cfg):
        print(f"note: {mismatch}: the two sides run different models", flush=True)
    commands = {"layerjax": [sys.executable, str(pathlib.Path(__file__).resolve()), "--config", args.config,
                             *args.overrides, "--steps", str(args.steps), "--warmup", str(args.warmup)],
                "torch": [sys.executable, str(TORCH_REF), *torch_ref_args(cfg), "--steps", str(args.steps)]}
    speeds = {"layerjax": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for name in round_order(i):
                out = pathlib.Path(tmp) / f"{name}{i}.json"
                done = subprocess.run([*commands[name], "--json", str(out)], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"bench: {name} run {i + 1} failed:\n{done.stderr[-2000:]}")
                speeds[name].append(json.loads(out.read_text())["tokens_per_s"])  # both tools name it so
                print(f"round {i + 1}/{rounds} {name:<9} {speeds[name][-1]:>10,.0f} tokens/s", flush=True)
            print(f"round {i + 1}/{rounds} ratio     {speeds['layerjax'][-1] / speeds['torch'][-1]:>10.2f}x", flush=True)
    result = summarize_rounds(speeds["layerjax"], speeds["torch"])
    print(f"median tokens/s: layerjax {result['layerjax_median']:,.0f}, torch {result['torch_median']:,.0f}; "
          f"ratio {result['ratio']:.2f}x", flush=True)
    print(f"per-round ratio: median {result['round_ratio_median']:.2f}x, range {result['round_ratio_min']:.2f}-"
          f"{result['round_ratio_max']:.2f}x, {result['rounds_at_least_1']} of {rounds} rounds at 1.0x or more",
          flush=True)
    return result


def compare_variants(args, variants: list[str], rounds: int) -> dict:
    """Times the config's train step (the baseline) and each variant of it (comma-separated
    overrides on top of the config's) in this one process, in rounds that alternate their order
    (ABBA), `--steps` steps each per round. A second copy of the baseline runs alongside as the
    noise floor. Reports per variant the median step time, the median and range of its per-round
    ratio to the baseline's step time (below 1: faster), its compile time and XLA temp memory.
    Every variant's state is alive at once: for configs that fit in memory several times over."""
    names = ["baseline", *variants, "baseline again"]
    configs = {}
    for name in names:  # every variant's config is checked before anything compiles
        extra = [] if name.startswith("baseline") else [o for o in name.split(",") if o]
        try:
            configs[name] = load_config(args.config, [*args.overrides, *extra])
        except ConfigError as error:
            sys.exit(f"bench: --versus {name!r}: config error: {error}")
    runs = {}
    for name, cfg in configs.items():
        cfg, setup, compiled, state, batch, compile_s = compiled_step(cfg)
        memory = compiled.memory_analysis()
        runs[name] = {"compiled": compiled, "state": state, "batch": batch, "compile_s": compile_s, "times": [],
                      "xla_temp_mib": None if memory is None else memory.temp_size_in_bytes / 2**20}
        print(f"compiled {name} in {compile_s:.1f} s", flush=True)

    def time_steps(run, count: int) -> float:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], run["batch"])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for run in runs.values():
        if args.warmup:
            time_steps(run, args.warmup)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            runs[name]["times"].append(time_steps(runs[name], max(args.steps, 1)))
        print(f"round {i + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * runs[n]['times'][-1]:.1f} ms" for n in names),
              flush=True)
    base = runs["baseline"]["times"]
    result = {}
    for name in names:
        ratios = [t / b for t, b in zip(runs[name]["times"], base)]
        result[name] = {"step_ms_median": 1e3 * statistics.median(runs[name]["times"]),
                        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                        "compile_s": runs[name]["compile_s"], "xla_temp_mib": runs[name]["xla_temp_mib"]}
    print(format_variants(result, rounds))
    return result


def format_variants(result: dict, rounds: int) -> str:
    rows = ["| variant | step, median | step time / baseline's, per round: median (range) | compile | XLA temp |",
            "|---|---|---|---|---|"]
    for name, r in result.items():
        temp = "" if r["xla_temp_mib"] is None else f"{r['xla_temp_mib']:.0f} MiB"
        rows.append(f"| {name} | {r['step_ms_median']:.1f} ms | {r['ratio_median']:.3f} ({r['ratio_min']:.3f}-"
                    f"{r['ratio_max']:.3f}) | {r['compile_s']:.1f} s | {temp} |")
    return "\n".join(rows) + f"\n({rounds} rounds; 'baseline again' shows the noise)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description="Time the jitted train step of a config on random tokens of its batch shape: compile time, "
                    "step time, tokens/s, MFU and per-device memory.",
        epilog="The preset is 'default' unless --config names one; overrides work as in train.py, "
               "e.g. tools/bench.py -c bench_cpu model.num_layers=48")
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, median reported; 0: compile and report memory only (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default: %(default)s)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s for MFU (default: a float32 matmul probe timed in the same run)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the result to this JSON file (default: print only)")
    parser.add_argument("--compare-torch", type=int, nargs="?", const=3, default=0, metavar="ROUNDS",
                        help="run this bench and ../shared/bench/torch_ref.py on the same shape, alternating, "
                             "ROUNDS times each (default 3), and print the median tokens/s, their ratio, and "
                             "the median and range of the per-round ratios")
    parser.add_argument("--versus", action="append", default=[], metavar="OVERRIDES",
                        help="a variant to time against the config in this one process, alternating: "
                             "comma-separated overrides, e.g. model.scan_unroll=1,model.remat=none; "
                             "repeat for several; --rounds rounds of --steps steps each")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of --versus (default: %(default)s)")
    args = parser.parse_intermixed_args(argv)
    if args.versus and args.compare_torch:
        parser.error("--versus and --compare-torch are separate comparisons; run them one at a time")
    if args.versus:
        result = compare_variants(args, args.versus, args.rounds)
    elif args.compare_torch:
        result = compare_torch(args, args.compare_torch)
    else:
        result = bench(config_from_args(args), args.steps, args.warmup, args.peak_flops)
        print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
