"""The canon convolution as one-pass CPU kernels (canon_cpu.cc), called through XLA's FFI.

cpu_kernels.py builds and registers them; where they cannot run, canon layers keep their pure-JAX
form, and the two agree to float32 rounding (tests/test_canon_kernel.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from layerjax.layers import cpu_kernels

MAX_TAPS = 64  # kMaxTaps in canon_cpu.cc


def blocker(h: jax.Array, kernel: int) -> str | None:
    """None when the kernel path can run this canon call, else why not (cpu_kernels.blocker: float32
    on one CPU device, and the library built; at most MAX_TAPS taps)."""
    if kernel > MAX_TAPS:
        return f"it takes at most {MAX_TAPS} taps, model.canon_kernel={kernel}"
    return cpu_kernels.blocker("canon", h.dtype)


def _segment_arg(segment_ids: jax.Array | None, rows_shape) -> tuple[jax.Array, np.int32]:
    if segment_ids is None:
        return jnp.zeros((1,), jnp.int32), np.int32(0)
    return jnp.broadcast_to(segment_ids.astype(jnp.int32), rows_shape), np.int32(1)


def _forward_call(h, w, segment_ids, residual: bool):
    cpu_kernels.require("canon")
    seg, has_seg = _segment_arg(segment_ids, h.shape[:-1])
    return jax.ffi.ffi_call("layerjax_canon_forward", jax.ShapeDtypeStruct(h.shape, h.dtype),
                            vmap_method="sequential")(h, w, seg, residual=np.int32(residual),
                                                      has_seg=has_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_conv(h: jax.Array, w: jax.Array, segment_ids: jax.Array | None, residual: bool) -> jax.Array:
    """(h if residual) + sum_i w[i] * h shifted i tokens later, taps masked across documents.
    h: [..., L, C] float32, w: [K, C] float32, segment_ids: [..., L] or None."""
    return _forward_call(h, w, segment_ids, residual)


def _causal_conv_fwd(h, w, segment_ids, residual):
    # Only the input is kept: the backward pass needs nothing the forward computed.
    return _forward_call(h, w, segment_ids, residual), (h, w, segment_ids)


def _causal_conv_bwd(residual, saved, g):
    h, w, segment_ids = saved
    cpu_kernels.require("canon")
    seg, has_seg = _segment_arg(segment_ids, h.shape[:-1])
    dh, dw = jax.ffi.ffi_call(
        "layerjax_canon_backward",
        (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype)),
        vmap_method="sequential")(g.astype(h.dtype), h, w, seg, residual=np.int32(residual), has_seg=has_seg)
    return dh, dw, None


causal_conv.defvjp(_causal_conv_fwd, _causal_conv_bwd)
