"""Model FLOPs per token, parameter counts, and a measured float32 matmul peak for MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from layerjax.config import ModelConfig, d_ff, head_dim, kv_heads, layer_experts
from layerjax.layers.mlp import GATED_ACTIVATIONS
from layerjax.model.block import projection_axes


def matmul_params(m: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all layer weights plus the output head
    (embedding lookups and norm gains do no matmul work)."""
    hd, kvh = head_dim(m), kv_heads(m)
    attn = m.d_model * hd * (2 * m.num_heads + 2 * kvh)
    mlp = m.d_model * d_ff(m) * (3 if m.mlp in GATED_ACTIVATIONS else 2)
    return m.num_layers * (attn + mlp) + m.d_model * m.vocab_size


def adapter_matmul_params(m: ModelConfig) -> int:
    """Adapter and router weights that take part in a matmul per token. Every expert counts, since
    all of a projection's experts are computed at once and then gated (layers/adapters.py); MoLE's
    one router per layer reads the MLP input once."""
    a = m.adapter
    if a.kind == "none":
        return 0
    shapes = {t: shape[:2] for t, shape in projection_axes(m).items() if t in a.targets}
    total = 0
    for experts in layer_experts(m):
        copies = max(experts, 1)
        total += sum(copies * a.rank * (d_in + d_out) for d_in, d_out in shapes.values())
        if a.kind == "mola":
            total += sum(d_in * experts for d_in, _ in shapes.values())
        elif a.kind == "mole":
            total += m.d_model * experts
    return total


def relax_matmul_params(m: ModelConfig) -> int:
    """Per-depth relaxation LoRA weights of shared blocks (model.recursion.lora_rank*): each depth's
    adapters run once per token."""
    r = m.recursion
    if not r.blocks:
        return 0
    ranks = {"attn": r.lora_rank, "mlp": r.lora_rank if r.lora_rank_mlp < 0 else r.lora_rank_mlp}
    per_depth = sum(ranks["attn" if t in ("q", "k", "v", "o") else "mlp"] * (d_in + d_out)
                    for t, (d_in, d_out, _) in projection_axes(m).items() if t in r.lora_targets)
    shared_depths = m.num_layers - (2 if r.pattern.startswith("middle") else 0)
    return shared_depths * per_depth


def unique_matmul_params(m: ModelConfig) -> int:
    """Matmul weights that exist once (shared blocks counted once), as opposed to `matmul_params`,
    which counts every depth: the effective, per-token FLOPs count of a recursive model."""
    r = m.recursion
    per_layer = (matmul_params(m) - m.d_model * m.vocab_size) // m.num_layers
    layers = m.num_layers if not r.blocks else r.blocks + (2 if r.pattern.startswith("middle") else 0)
    return layers * per_layer + m.d_model * m.vocab_size + relax_matmul_params(m)


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*L*H*K*T, or 4*N + 6*N_adapters + 12*L*H*K*T with a frozen base.

    6*N: forward (2 per multiply-add) plus backward (twice the forward) over the N matmul
    parameters of `matmul_params` (every depth, so a shared block counts once per use) and the
    per-depth relaxation LoRA of recursive models. A frozen base (model.adapter.kind != none) needs no weight
    gradients, only activation gradients: 4*N, and its adapters (`adapter_matmul_params`) the full
    6 each. 12*L*H*K*T: the attention score and value matmuls (2 matmuls * 2 FLOPs * 3 for
    fwd+bwd) over T keys per layer, counted without the causal halving, as in the PaLM paper's
    MFU convention.
    """
    base = (4.0 if m.adapter.kind != "none" else 6.0) * (matmul_params(m) + relax_matmul_params(m))
    return base + 6.0 * adapter_matmul_params(m) + 12.0 * m.num_layers * m.num_heads * head_dim(m) * seq_len


@functools.lru_cache(maxsize=None)
def measure_peak_flops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a jitted [size x size] matmul in `dtype` (the model's compute dtype) on the
    default device: the 'peak' that MFU is measured against, read on the spot so it reflects this
    machine. Measured once per process and dtype: runs in one process (an ablation grid, a test
    session) then share one yardstick, and each run after the first saves the probe (~1.5 s on
    a 2-core CPU)."""
    # Constant operands: the values do not change a matmul's speed, and generating random ones
    # cost more than the matmul itself where XLA optimises little (the test suite's flags).
    a = jnp.ones((size, size), jnp.dtype(dtype))
    b = jnp.full((size, size), 0.5, jnp.dtype(dtype))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
