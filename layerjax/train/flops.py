"""Model FLOPs per token, parameter counts, and a measured float32 matmul peak for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from layerjax.config import ModelConfig, d_ff, head_dim, kv_heads
from layerjax.layers.mlp import GATED_ACTIVATIONS


def matmul_params(m: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all layer weights plus the output head
    (embedding lookups and norm gains do no matmul work)."""
    hd, kvh = head_dim(m), kv_heads(m)
    attn = m.d_model * hd * (2 * m.num_heads + 2 * kvh)
    mlp = m.d_model * d_ff(m) * (3 if m.mlp in GATED_ACTIVATIONS else 2)
    return m.num_layers * (attn + mlp) + m.d_model * m.vocab_size


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*L*H*K*T.

    6*N: forward (2 per multiply-add) plus backward (twice the forward) over the N matmul
    parameters of `matmul_params`. 12*L*H*K*T: the attention score and value matmuls
    (2 matmuls * 2 FLOPs * 3 for fwd+bwd) over T keys per layer, counted without the causal
    halving, as in the PaLM paper's MFU convention.
    """
    return 6.0 * matmul_params(m) + 12.0 * m.num_layers * m.num_heads * head_dim(m) * seq_len


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 [size x size] matmul on the default device: the 'peak' that
    MFU is measured against, read on the spot so it reflects this machine and its load."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
