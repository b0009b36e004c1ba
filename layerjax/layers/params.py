"""Parameter creation with logical axis names.

Every parameter carries `axes`, a tuple of logical names (`embed`, `heads`, `mlp`, ...), one per
dimension. Only `layerjax/sharding.py` maps those names to mesh axes, so model code never
mentions a mesh.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, std: float) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def const_param(shape: tuple[int, ...], axes: tuple, value: float) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.full(shape, value, jnp.float32), axes=axes)
