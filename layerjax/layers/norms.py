"""RMSNorm and LayerNorm. Statistics are computed in float32 whatever the compute dtype."""

import functools

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
        self.scale = const_param(shape, axes, 0.0 if offset else 1.0)
        # LayerNorm always has its shift; RMSNorm gets one only if biases are asked for.
        self.bias = const_param(shape, axes, 0.0) if (kind == "layer" or use_bias) else None

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return normalize(x_BxLxD, self.scale[...], None if self.bias is None else self.bias[...],
                         self.kind == "layer", self.eps, self.offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x: jax.Array, gain: jax.Array, bias: jax.Array | None, centered: bool, eps: float,
              offset: bool) -> jax.Array:
    """Normalises x over its trailing gain.ndim axes in float32 (subtracting the mean first if
    `centered`: LayerNorm; else RMSNorm), then scales by gain (1 + gain with `offset`) and adds
    bias (if any); the result has x's dtype.

    The gradient is written out: dx = rstd (g' - x_hat mean(g' x_hat) [- mean(g')]) with
    g' = dy * gain, which XLA:CPU runs as one pass of two row reductions and one elementwise
    pass. JAX's derivative of the formula took several passes: the bench_cpu step was 1.702 s
    against 1.782 s with it (interleaved in one process, 12 rounds; 1.820 / 1.807 against
    1.899 / 1.832 in another run). First-order only (jax.custom_vjp)."""
    return _normalize_fwd(x, gain, bias, centered, eps, offset)[0]


def _normalized(x32: jax.Array, axes: tuple[int, ...], centered: bool, eps: float):
    if centered:
        x32 = x32 - jnp.mean(x32, axis=axes, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    return x32 * rstd, rstd


def _normalize_fwd(x, gain, bias, centered, eps, offset):
    x_hat, _ = _normalized(x.astype(jnp.float32), tuple(range(-gain.ndim, 0)), centered, eps)
    g = gain.astype(jnp.float32)
    y = x_hat * (1.0 + g if offset else g)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, gain, bias)


def _normalize_bwd(centered, eps, offset, saved, dy):
    x, gain, bias = saved
    axes, lead = tuple(range(-gain.ndim, 0)), tuple(range(x.ndim - gain.ndim))
    x_hat, rstd = _normalized(x.astype(jnp.float32), axes, centered, eps)  # recomputed: x is saved
    dy = dy.astype(jnp.float32)
    g = gain.astype(jnp.float32)
    dx_hat = dy * (1.0 + g if offset else g)
    dx = dx_hat - x_hat * jnp.mean(dx_hat * x_hat, axis=axes, keepdims=True)
    if centered:
        dx = dx - jnp.mean(dx_hat, axis=axes, keepdims=True)
    d_gain = jnp.sum(dy * x_hat, axis=lead).astype(gain.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=lead).astype(bias.dtype)
    return (dx * rstd).astype(x.dtype), d_gain, d_bias


normalize.defvjp(_normalize_fwd, _normalize_bwd)
