"""Residual-stream statistics, pure functions of hidden states (used inside the layer scan)."""

import jax
import jax.numpy as jnp


def angular_distance(a_BxLxD: jax.Array, b_BxLxD: jax.Array) -> jax.Array:
    """arccos(cos(a_t, b_t)) / pi averaged over tokens t: 0 for parallel states, 1 for opposite."""
    a, b = a_BxLxD.astype(jnp.float32), b_BxLxD.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) * jax.lax.rsqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1) + 1e-30)
    return jnp.mean(jnp.arccos(jnp.clip(cos, -1.0, 1.0))) / jnp.pi


def residual_stats(x_in_BxLxD: jax.Array, x_out_BxLxD: jax.Array) -> dict[str, jax.Array]:
    """Scalars describing a layer's output x_out (over all tokens and features) and how far the
    layer turned each token's state (angular distance between its input and output)."""
    y = x_out_BxLxD.astype(jnp.float32)
    return {
        "rms": jnp.sqrt(jnp.mean(jnp.square(y))),
        "variance": jnp.var(y),
        "max_abs": jnp.max(jnp.abs(y)),
        "angular_distance": angular_distance(x_in_BxLxD, x_out_BxLxD),
    }
