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


def _forward_call(qkv, mask, heads, scale, logit_cap):
    cpu_kernels.require("attention")
    batch, length, _, dim = qkv.shape
    out, lse = jax.ffi.ffi_call(
        "layerjax_attention_forward",
        (jax.ShapeDtypeStruct((batch, length, heads, dim), qkv.dtype),
         jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)),
        vmap_method="sequential")(qkv, _mask_bytes(mask, batch), scale=np.float32(scale),
                                  logit_cap=np.float32(logit_cap))
    return checkpoint_name(out, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def packed_attention(qkv_BxLxCxK, mask_BxLxL, heads: int, scale: float, logit_cap: float) -> jax.Array:
    """Self-attention of token-major heads: qkv_BxLxCxK holds each token's `heads` query heads,
    then its key heads, then as many value heads (C = heads + 2 * kv heads), the layout the fused
    q, k, v projection writes; returns [B, L, heads, K], the layout the output projection reads.
    The kernel indexes these layouts directly, so no transpose or concatenation surrounds it."""
    return _forward_call(qkv_BxLxCxK, mask_BxLxL, heads, scale, logit_cap)[0]


def _packed_attention_fwd(qkv, mask, heads, scale, logit_cap):
    out, lse = _forward_call(qkv, mask, heads, scale, logit_cap)
    return out, (qkv, mask, out, lse)


def _packed_attention_bwd(heads, scale, logit_cap, saved, d_out):
    qkv, mask, out, lse = saved
    cpu_kernels.require("attention")
    dqkv = jax.ffi.ffi_call("layerjax_attention_backward", jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                            vmap_method="sequential")(
        qkv, _mask_bytes(mask, qkv.shape[0]), out, lse, d_out.astype(qkv.dtype),
        scale=np.float32(scale), logit_cap=np.float32(logit_cap))
    return dqkv, None


packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)


def cpu_attention(q_BxHxLxK, k_BxNxLxK, v_BxNxLxK, mask_BxLxL, scale: float, logit_cap: float) -> jax.Array:
    """softmax(scale * q k^T) v over the keys mask_BxLxL shows (scale: resolved, not 0), in the
    heads-first layout of the other kernels. The attention layer splits its projection into q, k
    and v and moves heads first; the regrouping here undoes both, and XLA folds each pair away
    (transpose of a transpose, concatenation of adjacent slices), so in a model the kernel reads
    the projection's output as is and its gradient feeds the projection's backward directly."""
    qkv = jnp.concatenate([jnp.swapaxes(t, 1, 2) for t in (q_BxHxLxK, k_BxNxLxK, v_BxNxLxK)], axis=2)
    out_BxLxHxK = packed_attention(qkv, mask_BxLxL, q_BxHxLxK.shape[1], scale, logit_cap)
    return jnp.swapaxes(out_BxLxHxK, 1, 2)
