"""RMSNorm and LayerNorm. Statistics are computed in float32 whatever the compute dtype."""

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.params import const_param


class Norm(nnx.Module):
    """RMSNorm (`kind="rms"`): x / rms(x) * g.  LayerNorm (`kind="layer"`): (x - mean) / std * g + b.

    `dim` may be a shape (with one axis name per axis): the norm then runs over that many trailing
    axes, e.g. [heads, head_dim] for a full-width QK-norm whose gain shards like q itself.
    offset=True is Gemma's form: the gain is (1 + g) with g initialised to 0."""

    def __init__(self, dim: int | tuple[int, ...], kind: str, eps: float, use_bias: bool = False,
                 axis_name: str | tuple[str, ...] = "embed", offset: bool = False):
        shape = (dim,) if isinstance(dim, int) else tuple(dim)
        axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
        self.kind, self.eps, self.offset = kind, eps, offset
        self.reduce_axes = tuple(range(-len(shape), 0))
        self.scale = const_param(shape, axes, 0.0 if offset else 1.0)
        # LayerNorm always has its shift; RMSNorm gets one only if biases are asked for.
        self.bias = const_param(shape, axes, 0.0) if (kind == "layer" or use_bias) else None

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        axes = self.reduce_axes
        if self.kind == "layer":
            x = x - jnp.mean(x, axis=axes, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + self.eps)
        gain = self.scale[...].astype(jnp.float32)
        y = y * (1.0 + gain if self.offset else gain)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x_BxLxD.dtype)
