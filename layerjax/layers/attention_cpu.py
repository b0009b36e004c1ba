"""Attention through the CPU kernel (attention_cpu.cc, model.attention_impl=cpu_kernel): the same
function as the JAX kernels in attention_kernels.py, forward and backward in C++ through XLA's FFI.

The forward keeps only the output and each row's log-sum-exp; both are named, so the remat
policies keep them and the backward pass never reruns the forward (layerjax.model.transformer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from layerjax.layers import cpu_kernels

# The names the remat policies save (REMAT_POLICIES in layerjax/model/transformer.py).
SAVED_NAMES = ("cpu_attention_out", "cpu_attention_lse")


def blocker(q_BxHxLxK: jax.Array, self_attention: bool) -> str | None:
    """None when this attention call can run the kernel, else why not: self-attention over whole
    sequences (decoding steps run the reference), a head dim that is a multiple of 16, and
    cpu_kernels.blocker's float32 on one CPU device with the library built."""
    if not self_attention:
        return "it computes self-attention over whole sequences, not decoding steps"
    if q_BxHxLxK.shape[-1] % 16:
        return f"it needs a head dim that is a multiple of 16, not {q_BxHxLxK.shape[-1]}"
    return cpu_kernels.blocker("attention", q_BxHxLxK.dtype)


def _mask_bytes(mask_BxLxS: jax.Array, batch: int) -> jax.Array:
    """The mask as uint8, one per batch row (`visible` may give one for all), with keys padded to
    a multiple of 16 (the kernel's key tiles)."""
    _, length, keys = mask_BxLxS.shape
    mask = jnp.broadcast_to(mask_BxLxS, (batch, length, keys)).astype(jnp.uint8)
    return jnp.pad(mask, ((0, 0), (0, 0), (0, -keys % 16)))


def _forward_call(q, k, v, mask, scale, logit_cap):
    cpu_kernels.require("attention")
    out, lse = jax.ffi.ffi_call(
        "layerjax_attention_forward",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)),
        vmap_method="sequential")(q, k, v, _mask_bytes(mask, q.shape[0]), scale=np.float32(scale),
                                  logit_cap=np.float32(logit_cap))
    return checkpoint_name(out, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cpu_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, mask_BxLxS, scale: float, logit_cap: float) -> jax.Array:
    """softmax(scale * q k^T) v over the keys mask_BxLxS shows (scale: resolved, not 0)."""
    return _forward_call(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, mask_BxLxS, scale, logit_cap)[0]


def _cpu_attention_fwd(q, k, v, mask, scale, logit_cap):
    out, lse = _forward_call(q, k, v, mask, scale, logit_cap)
    return out, (q, k, v, mask, out, lse)


def _cpu_attention_bwd(scale, logit_cap, saved, d_out):
    q, k, v, mask, out, lse = saved
    cpu_kernels.require("attention")
    dq, dk, dv = jax.ffi.ffi_call(
        "layerjax_attention_backward",
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
        vmap_method="sequential")(q, k, v, _mask_bytes(mask, q.shape[0]), out, lse, d_out.astype(q.dtype),
                                  scale=np.float32(scale), logit_cap=np.float32(logit_cap))
    return dq, dk, dv, None


cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)
