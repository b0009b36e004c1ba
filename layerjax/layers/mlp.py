"""The feed-forward sublayer: SwiGLU (gate and up fused in one weight) or GELU."""

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.params import const_param, normal_param


class MLP(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, use_bias: bool, init_std: float, rngs: nnx.Rngs):
        self.kind = kind
        # SwiGLU's gate and up projections share one [D, 2, F] weight: one matmul instead of two.
        width = 2 if kind == "swiglu" else 1
        self.wi = normal_param(rngs, (d_model, width, d_ff), ("embed", None, "mlp"), init_std)
        self.wo = normal_param(rngs, (d_ff, d_model), ("mlp", "embed"), init_std)
        self.bi = const_param((width, d_ff), (None, "mlp"), 0.0) if use_bias else None
        self.bo = const_param((d_model,), ("embed",), 0.0) if use_bias else None

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dtype = x_BxLxD.dtype
        h_BxLxWxF = jnp.einsum("bld,dwf->blwf", x_BxLxD, self.wi[...].astype(dtype))
        if self.bi is not None:
            h_BxLxWxF = h_BxLxWxF + self.bi[...].astype(dtype)
        if self.kind == "swiglu":
            h_BxLxF = jax.nn.silu(h_BxLxWxF[:, :, 0]) * h_BxLxWxF[:, :, 1]
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxWxF[:, :, 0], approximate=True)
        out_BxLxD = jnp.einsum("blf,fd->bld", h_BxLxF, self.wo[...].astype(dtype))
        if self.bo is not None:
            out_BxLxD = out_BxLxD + self.bo[...].astype(dtype)
        return out_BxLxD
