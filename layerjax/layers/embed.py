"""Token embeddings (with the tied output head), learned positions and rotary positions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerjax.layers.params import dense, normal_param


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, std: float, rngs: nnx.Rngs, scaled: bool = False):
        """scaled: the lookup is multiplied by sqrt(dim) (Gemma); the tied head is not."""
        self.table = normal_param(rngs, (vocab_size, dim), ("vocab", "embed"), std)
        self.multiplier = dim**0.5 if scaled else None

    def __call__(self, tokens_BxL: jax.Array, dtype) -> jax.Array:
        x_BxLxD = jnp.take(self.table[...], tokens_BxL, axis=0).astype(dtype)
        if self.multiplier is not None:  # rounded to the compute dtype first, as Gemma does
            x_BxLxD = x_BxLxD * jnp.asarray(self.multiplier, dtype)
        return x_BxLxD

    def attend(self, x_BxLxD: jax.Array, matmul: str = "xla") -> jax.Array:
        """The tied output head: logits against every token's embedding. matmul: `dense`'s impl."""
        return dense(x_BxLxD, self.table[...], impl=matmul, w_transposed=True)


class LearnedPositions(nnx.Module):
    def __init__(self, max_len: int, dim: int, std: float, rngs: nnx.Rngs):
        self.table = normal_param(rngs, (max_len, dim), (None, "embed"), std)

    def __call__(self, positions_BxL: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.table[...], positions_BxL, axis=0).astype(dtype)


def rope_frequencies(dims: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> np.ndarray:
    """The [dims/2] float32 inverse frequencies theta^(-2i/dims) of RoPE over `dims` rotated
    channels, with Hugging Face's scalings (transformers.modeling_rope_utils):
      "linear": every frequency / factor;
      "llama3": wavelengths above original_max_len / low_freq_factor are stretched by factor, those
        below original_max_len / high_freq_factor kept, the band between blended smoothly.
    Computed with Hugging Face's float32 operations in its order, so imported models see the same
    angles (bit-equal for ~98% of frequencies, the rest within 1e-6): only the power is taken in
    float64 and rounded, since torch's float32 pow is nearly correctly rounded and NumPy's is not."""
    f32 = np.float32
    exponents = np.arange(0, dims, 2).astype(f32) / f32(dims)
    inv_freq = f32(1.0) / (np.float64(f32(theta)) ** exponents.astype(np.float64)).astype(f32)
    if scaling == "linear":
        inv_freq = inv_freq / f32(factor)
    elif scaling == "llama3":
        low_freq_wavelen = original_max_len / low_freq_factor
        high_freq_wavelen = original_max_len / high_freq_factor
        wavelen = f32(2 * math.pi) / inv_freq
        stretched = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
        smooth = (f32(original_max_len) / wavelen - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
        smoothed = (f32(1) - smooth) * stretched / f32(factor) + smooth * stretched
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, stretched)
    elif scaling != "none":
        raise ValueError(f"unknown rope scaling {scaling!r}")
    return inv_freq.astype(f32)


def apply_rope(x_BxHxLxK: jax.Array, positions_BxL: jax.Array, inv_freq_R) -> jax.Array:
    """Rotates channel pairs (i, i + R) by position * inv_freq[i] (the Llama/NeoX layout) within
    the first 2R channels; the channels after them pass through (partial RoPE when 2R < K)."""
    half = len(inv_freq_R)
    inv_freq_R = jnp.asarray(np.asarray(inv_freq_R, np.float32))
    angles_Bx1xLxR = (positions_BxL.astype(jnp.float32)[..., None] * inv_freq_R)[:, None, :, :]
    sin, cos = jnp.sin(angles_Bx1xLxR), jnp.cos(angles_Bx1xLxR)
    x = x_BxHxLxK.astype(jnp.float32)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x_BxHxLxK.dtype)
