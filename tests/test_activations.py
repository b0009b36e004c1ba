"""The MLP activations' hand-written gradients equal JAX's own through jax.nn's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerjax.layers.activations import gelu_tanh, silu

REFERENCES = {"gelu_tanh": (gelu_tanh, lambda x: jax.nn.gelu(x, approximate=True)), "silu": (silu, jax.nn.silu)}


@pytest.mark.parametrize("name", REFERENCES)
def test_values_and_gradients_equal_jax_nn(name):
    mine, reference = REFERENCES[name]
    x = jnp.concatenate([jnp.linspace(-20.0, 20.0, 401), jnp.array([0.0, -1e-7, 1e-7, 3.0, -3.0])])
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32))  # a cotangent that is not all ones
    np.testing.assert_allclose(jax.jit(mine)(x), jax.jit(reference)(x), rtol=1e-6, atol=1e-7)
    grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * weights)))(x)
    # atol: near x = -7 the derivative (~1e-5) is the difference of two float32 terms near 1e-5,
    # which each formula rounds in its own way (by up to 1.4e-6)
    np.testing.assert_allclose(grad(mine), grad(reference), rtol=2e-5, atol=3e-6)
    half = jax.grad(lambda x: jnp.sum(mine(x)))(x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16  # the gradient keeps the activation's dtype
