#!/usr/bin/env python3
"""Time each part of the train step on its own, in layerjax and in plain PyTorch, at a config's shape.

    python tools/bench_parts.py -c bench_cpu [--rounds 3] [--calls 10] [section.field=value ...]

`tools/bench.py --compare-torch` gives one ratio for the whole step; this says which parts make
it. Each part runs forward and backward (the optimizer: one update) as the step runs it: layerjax's
own functions, jitted, against the same operation of `../shared/bench/torch_ref.py`'s model in
eager PyTorch (nn.Linear-style matmuls, fused SDPA, LayerNorm, GELU, cross-entropy, AdamW). Each
round times every part of one side in a fresh process, then of the other (the first side
alternating by round), `--rounds` times; each figure is the median of `--calls` calls, then of
the rounds, times how often the step runs the part. The sides never share a process: there the
two libraries' worker threads slowed both steps, PyTorch's more.

Both whole train steps are timed too (layerjax's jitted step; torch_ref.py's own), and what no
part covers (the embedding lookup, residual adds, the layer scan's stacking of saved activations,
the loss's metrics, Python overhead) is printed as the rest: the step minus the parts' sum. The
shape follows torch_ref's model: a config with another architecture is refused by name.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from layerjax.allocator import use_tcmalloc  # noqa: E402

if __name__ == "__main__":
    use_tcmalloc()  # before jax is imported, as tools/bench.py does: both tools time the same process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402



def load_script(path: pathlib.Path, name: str):
    """A Python file (a sibling tool, the PyTorch reference) loaded as a module by its path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# tools/bench.py: the reference's location, the random batch and the model check are one thing.
bench = load_script(pathlib.Path(__file__).resolve().parent / "bench.py", "layerjax_tools_bench")
TORCH_REF, random_batch, reference_mismatches = bench.TORCH_REF, bench.random_batch, bench.reference_mismatches
from layerjax.cli import add_config_args, config_from_args  # noqa: E402
from layerjax.config import d_ff  # noqa: E402


WHOLE_STEP = "whole train step"


def part_shapes(cfg) -> dict:
    m, d = cfg.model, cfg.data
    return {"batch": d.batch_size, "seq": d.seq_len, "width": m.d_model, "heads": m.num_heads,
            "ff": d_ff(m), "vocab": m.vocab_size or d.synthetic_vocab, "layers": m.num_layers}


def layer_matmuls(x, w_qkv, w_o, w_in, w_out, impl: str = "xla"):
    """One layer's four weight matmuls in layerjax (its `dense`, impl: model.matmul_impl resolved),
    side by side."""
    from layerjax.layers.params import dense

    qkv = dense(x, w_qkv, impl=impl)
    y = dense(x, w_o, impl=impl) + dense(dense(x, w_in, impl=impl), w_out, impl=impl)
    return jnp.concatenate([qkv, y], axis=-1)


def forward_backward(f):
    """(cotangent, *args) -> (f's value, the gradients of every argument): a part's forward and
    backward as the step runs them. The value is returned, not only the gradients: otherwise XLA
    drops every forward op whose result the backward does not read (the forward of a linear map,
    e.g. three of a layer's four weight matmuls) and the part looks cheaper than it is, while
    PyTorch's eager forward computes everything."""
    def run(cotangent, *args):
        value, vjp = jax.vjp(f, *args)
        return value, vjp(cotangent)
    return run


def jax_parts(cfg) -> dict:
    """{part: (calls per step, a function of no arguments that runs it and waits)}, in layerjax."""
    from layerjax.layers.activations import gelu_tanh
    from layerjax.layers.attention_cpu import packed_attention
    from layerjax.layers.matmul_cpu import resolve_matmul_impl
    from layerjax.layers.norms import normalize
    from layerjax.layers.params import dense
    from layerjax.train.head_loss import cross_entropy
    from layerjax.train.state import build_setup, init_state, jit_train_step
    from layerjax.train.step import apply_gradients

    s = part_shapes(cfg)
    b, l, w, h, ff, v = s["batch"], s["seq"], s["width"], s["heads"], s["ff"], s["vocab"]
    # numpy draws: jax.random would compile once per shape, most of this tool's start-up.
    rng = np.random.default_rng(0)
    normal = lambda *shape, scale=1.0, dtype=np.float32: jnp.asarray(
        (rng.standard_normal(shape, np.float32) * np.float32(scale)).astype(dtype))
    weight = lambda *shape: normal(*shape, scale=0.02)

    def fwd_bwd(f, *args):
        cotangent = normal(*jax.eval_shape(f, *args).shape)
        run = jax.jit(forward_backward(f))
        return lambda: jax.block_until_ready(run(cotangent, *args))

    matmul = resolve_matmul_impl(cfg.model)

    def head_loss(hidden, table, targets):
        return jnp.mean(cross_entropy(dense(hidden, table, impl=matmul, w_transposed=True), targets)[0])

    causal = jnp.tril(jnp.ones((l, l), bool))[None]
    targets = jnp.asarray(rng.integers(0, v, (b * l,), dtype=np.int32))
    setup = build_setup(cfg)
    state = init_state(setup, 0)
    grads = jax.tree.map(lambda p: normal(*p.shape, scale=1e-3, dtype=p.dtype), state.params)
    # A second state for the whole step (both are donated), copied through the host: no compile.
    stepped = [jax.device_put(jax.device_get(state), setup.state_shardings)]
    update = jax.jit(lambda st, g: apply_gradients(st, g, jnp.float32(1.0), setup.tx, setup.schedule, cfg), donate_argnums=0)
    current = [state]

    def optimizer():
        current[0] = jax.block_until_ready(update(current[0], grads)[0])

    batch = {k: jax.device_put(a, setup.batch_sharding) for k, a in random_batch(cfg, v).items()}
    train_step = jit_train_step(setup)

    def whole_step():
        stepped[0] = jax.block_until_ready(train_step(stepped[0], batch)[0])

    return {
        WHOLE_STEP: (1, whole_step),
        "weight matmuls (4 per layer)": (s["layers"], fwd_bwd(functools.partial(layer_matmuls, impl=matmul), normal(b * l, w), weight(w, 3 * w),
                                                             weight(w, w), weight(w, ff), weight(ff, w))),
        "attention": (s["layers"], fwd_bwd(lambda qkv: packed_attention(qkv, causal, h, (w // h) ** -0.5, 0.0),
                                           normal(b, l, 3 * h, w // h))),
        "LayerNorm": (2 * s["layers"] + 1, fwd_bwd(lambda x, g, bias: normalize(x, g, bias, True, 1e-5, False),
                                                   normal(b, l, w), jnp.ones(w), jnp.zeros(w))),
        "GELU": (s["layers"], fwd_bwd(gelu_tanh, normal(b * l, ff))),
        "tied head + cross-entropy": (1, fwd_bwd(lambda x, table: head_loss(x, table, targets), normal(b * l, w),
                                                 weight(v, w))),
        "AdamW update (+ clip, norms, guard)": (1, optimizer),
    }


def torch_parts(cfg) -> dict:
    """The same parts in eager PyTorch, as torch_ref.py's model runs them."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    s = part_shapes(cfg)
    b, l, w, h, ff, v = s["batch"], s["seq"], s["width"], s["heads"], s["ff"], s["vocab"]
    leaf = lambda *shape, scale=0.02: (torch.randn(*shape) * scale).requires_grad_()

    def fwd_bwd(f, *args):
        out = f(*args)
        cotangent = torch.randn_like(out)

        def run():
            for a in args:
                a.grad = None
            f(*args).backward(cotangent)
        return run

    def matmuls(x, w_qkv, w_o, w_in, w_out):  # nn.Linear's layout: weights [out, in]
        return torch.cat([F.linear(x, w_qkv), F.linear(x, w_o) + F.linear(F.linear(x, w_in), w_out)], dim=-1)

    def attention(qkv):
        q, k, vv = qkv.split(w, dim=2)
        q, k, vv = (z.view(b, l, h, w // h).transpose(1, 2) for z in (q, k, vv))
        return F.scaled_dot_product_attention(q, k, vv, is_causal=True).transpose(1, 2).reshape(b, l, w)

    targets = torch.randint(0, v, (b * l,))
    params = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for shape in _param_shapes(cfg)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)

    def optimizer():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return {
        WHOLE_STEP: (1, _torch_ref_step(s)),
        "weight matmuls (4 per layer)": (s["layers"], fwd_bwd(matmuls, leaf(b * l, w), leaf(3 * w, w), leaf(w, w),
                                                             leaf(ff, w), leaf(w, ff))),
        "attention": (s["layers"], fwd_bwd(attention, leaf(b, l, 3 * w, scale=1.0))),
        "LayerNorm": (2 * s["layers"] + 1, fwd_bwd(lambda x, g: F.layer_norm(x, (w,), g), leaf(b, l, w, scale=1.0),
                                                   torch.ones(w, requires_grad=True))),
        "GELU": (s["layers"], fwd_bwd(F.gelu, leaf(b * l, ff, scale=1.0))),
        "tied head + cross-entropy": (1, fwd_bwd(lambda x, t: F.cross_entropy(x @ t.T, targets), leaf(b * l, w, scale=1.0),
                                                 leaf(v, w))),
        "AdamW update (+ clip, norms, guard)": (1, optimizer),
    }


def _torch_ref_step(s: dict):
    """torch_ref.py's own train step (its model, cross-entropy, AdamW) at these shapes."""
    import torch
    import torch.nn.functional as F

    torch_ref = load_script(TORCH_REF, "torch_ref")
    model = torch_ref.Decoder(s["vocab"], s["seq"], s["width"], s["layers"], s["heads"], s["ff"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = (torch.randint(0, s["vocab"], (s["batch"], s["seq"])) for _ in range(2))

    def step():
        F.cross_entropy(model(x).view(-1, s["vocab"]), y.view(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _param_shapes(cfg) -> list[tuple[int, ...]]:
    """The shapes of torch_ref's parameters at this config (embeddings, per layer 4 matmuls and 2
    LayerNorm gains, the final gain)."""
    s = part_shapes(cfg)
    w, ff = s["width"], s["ff"]
    per_layer = [(3 * w, w), (w, w), (ff, w), (w, ff), (w,), (w,)]
    return [(s["vocab"], w), (s["seq"], w), *per_layer * s["layers"], (w,)]


def median_ms(run, calls: int) -> float:
    run()  # warm-up (and the compile, on the JAX side)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def side_times(cfg, side: str, calls: int) -> dict:
    """{part: [calls per step, median ms per call]} of one side, in this process."""
    parts = jax_parts(cfg) if side == "layerjax" else torch_parts(cfg)
    return {name: [count, median_ms(run, calls)] for name, (count, run) in parts.items()}


def run_side(side: str, config_argv: list[str], calls: int) -> dict:
    """`side_times` in a fresh process (see the module docstring for why the sides never share one)."""
    out = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--side", side,
                          "--calls", str(calls), *config_argv], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_parts: the {side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def compare_parts(config_argv: list[str], rounds: int, calls: int) -> list[dict]:
    """Each round times both sides, one process each, the first side alternating by round."""
    samples = {"layerjax": [], "torch": []}
    for index in range(rounds):
        for side in bench.round_order(index):  # the ABBA order of --compare-torch
            samples[side].append(run_side(side, config_argv, calls))
    rows = []
    for name, (count, _) in samples["layerjax"][0].items():
        median = lambda side: count * statistics.median(times[name][1] for times in samples[side])
        rows.append({"part": name, "per_step": count, "layerjax_ms": median("layerjax"), "torch_ms": median("torch")})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| part | calls per step | layerjax ms / step | PyTorch ms / step | layerjax / PyTorch time |",
             "|---|---|---|---|---|"]
    parts = [r for r in rows if r["part"] != WHOLE_STEP]
    total = {key: sum(r[key] for r in parts) for key in ("layerjax_ms", "torch_ms")}
    whole = next(r for r in rows if r["part"] == WHOLE_STEP)
    rest = {key: whole[key] - total[key] for key in total}
    for r in parts + [{"part": "sum of the parts", "per_step": "", **total},
                      {"part": "the rest (whole step - parts)", "per_step": "", **rest}, whole]:
        ratio = f"{r['layerjax_ms'] / r['torch_ms']:.2f}×" if min(r["layerjax_ms"], r["torch_ms"]) > 0 else "-"
        lines.append(f"| {r['part']} | {r['per_step']} | {r['layerjax_ms']:,.1f} | {r['torch_ms']:,.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per part and round (default: %(default)s)")
    parser.add_argument("--side", choices=("layerjax", "torch"), help=argparse.SUPPRESS)  # one side's process
    args = parser.parse_intermixed_args(argv)
    cfg = config_from_args(args)
    if args.side:
        print(json.dumps(side_times(cfg, args.side, args.calls)))
        return []
    mismatches = reference_mismatches(cfg)
    if mismatches:
        sys.exit("bench_parts: the parts follow torch_ref.py's model; this config differs: " + "; ".join(mismatches))
    if not TORCH_REF.is_file():
        sys.exit(f"bench_parts: needs {TORCH_REF} (the PyTorch reference); it is not there")
    if importlib.util.find_spec("torch") is None:
        sys.exit("bench_parts: needs PyTorch (pip install torch==2.13.0, the CPU build)")
    rows = compare_parts(["-c", args.config, *args.overrides], args.rounds, args.calls)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
