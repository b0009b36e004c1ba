"""RMSNorm and LayerNorm. Statistics are computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.params import const_param


class Norm(nnx.Module):
    """RMSNorm (`kind="rms"`): x / rms(x) * g.  LayerNorm (`kind="layer"`): (x - mean) / std * g + b."""

    def __init__(self, dim: int, kind: str, eps: float, use_bias: bool = False, axis_name: str = "embed"):
        self.kind, self.eps = kind, eps
        self.scale = const_param((dim,), (axis_name,), 1.0)
        # LayerNorm always has its shift; RMSNorm gets one only if biases are asked for.
        self.bias = const_param((dim,), (axis_name,), 0.0) if (kind == "layer" or use_bias) else None

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        if self.kind == "layer":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x_BxLxD.dtype)
