"""Parameter creation with logical axis names.

Every parameter carries `axes`, a tuple of logical names (`embed`, `heads`, `mlp`, ...), one per
dimension. Only `layerjax/sharding.py` maps those names to mesh axes, so model code never
mentions a mesh.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers import matmul_cpu


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, std: float) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes=axes)


def const_param(shape: tuple[int, ...], axes: tuple, value: float) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.full(shape, value, jnp.float32), axes=axes)


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1, impl: str = "xla", w_transposed: bool = False) -> jax.Array:
    """x[..., in] @ w[in, out...] as one 2-D matmul over all leading (token) dimensions.

    `in_dims` trailing dims of x contract with the leading dims of w. Flattening the tokens
    first matters on XLA:CPU: a [B, L, D] x [D, F] einsum made XLA transpose the [B*L, F]
    gradient in the backward pass, and the 2-D form ran the bench_cpu MLP 1.55x faster.
    impl (model.matmul_impl, resolved): "mkl" runs the matmul through MKL where it can
    (matmul_cpu.py: float32 on one CPU device), else XLA's dot. w_transposed: w is [out, in]
    (a tied head reading the embedding table), with in_dims 1.
    """
    assert not (w_transposed and in_dims != 1), "w_transposed takes one contracted dim"
    lead = x.shape[: x.ndim - in_dims]
    contract = w.shape[1:] if w_transposed else w.shape[:in_dims]
    out_shape = w.shape[:1] if w_transposed else w.shape[in_dims:]
    assert x.shape[x.ndim - in_dims:] == contract, (x.shape, w.shape)
    x_TxI = x.reshape(-1, math.prod(contract))
    w_2d = w.astype(x.dtype) if w_transposed else w.reshape(math.prod(contract), -1).astype(x.dtype)
    if impl == "mkl" and matmul_cpu.blocker(x.dtype) is None:
        out = matmul_cpu.matmul(x_TxI, w_2d, w_transposed)
    else:
        out = x_TxI @ (w_2d.T if w_transposed else w_2d)
    return out.reshape(*lead, *out_shape)
