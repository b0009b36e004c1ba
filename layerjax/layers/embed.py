"""Token embeddings (with the tied output head), learned positions and rotary positions."""

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.params import dense, normal_param


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, std: float, rngs: nnx.Rngs):
        self.table = normal_param(rngs, (vocab_size, dim), ("vocab", "embed"), std)

    def __call__(self, tokens_BxL: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.table[...], tokens_BxL, axis=0).astype(dtype)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        """The tied output head: logits against every token's embedding."""
        return dense(x_BxLxD, self.table[...].T)


class LearnedPositions(nnx.Module):
    def __init__(self, max_len: int, dim: int, std: float, rngs: nnx.Rngs):
        self.table = normal_param(rngs, (max_len, dim), (None, "embed"), std)

    def __call__(self, positions_BxL: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.table[...], positions_BxL, axis=0).astype(dtype)


def apply_rope(x_BxHxLxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotates channel pairs (i, i + K/2) by position * theta^(-2i/K) (the Llama/NeoX layout)."""
    half = x_BxHxLxK.shape[-1] // 2
    freqs_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_Bx1xLxK2 = (positions_BxL.astype(jnp.float32)[..., None] * freqs_K2)[:, None, :, :]
    sin, cos = jnp.sin(angles_Bx1xLxK2), jnp.cos(angles_Bx1xLxK2)
    x1, x2 = jnp.split(x_BxHxLxK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxHxLxK.dtype)
