"""Dense-layer matmuls through MKL (model.matmul_impl=mkl, layerjax/layers/matmul_cpu.py) against
XLA's dot: outputs and both gradients for every operand layout `dense` passes, row and column
splits, one-token decoding; a train step equal to XLA's; where `auto` picks MKL, what the remat
policies keep, and what happens where MKL cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from layerjax.config import ConfigError, load_config
from layerjax.layers import matmul_cpu
from layerjax.layers.params import dense
from layerjax.sharding import activation_sharding
from layerjax.train.state import build_setup, init_state, jit_train_step
from multiprocess_worker import fixed_batches

needs_mkl = pytest.mark.skipif(matmul_cpu.unavailable_reason() is not None,
                               reason=f"MKL matmul unavailable: {matmul_cpu.unavailable_reason()}")


def one_device():
    """Traces as the train step of a one-device mesh does (the tests' process has 8 devices)."""
    return activation_sharding(Mesh(np.array(jax.devices()[:1]), ("data",)), {})


def dense_and_grads(x, w, in_dims, impl, w_transposed):
    def loss(x, w):
        out = dense(x, w, in_dims, impl, w_transposed)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1])), out

    with one_device():
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return out, *grads


@needs_mkl
@pytest.mark.parametrize("x_shape, w_shape, in_dims, w_transposed", [
    ((3, 37, 20), (20, 53), 1, False),   # more rows than columns: blocks of rows
    ((2, 5, 24), (24, 300), 1, False),   # more columns: blocks of columns
    ((2, 50, 4, 8), (4, 8, 19), 2, False),  # heads contracted (the attention output projection)
    ((3, 70, 20), (41, 20), 1, True),    # the tied head: w is [out, in]
    ((1, 1, 16), (16, 300), 1, False),   # one decoding token
])
def test_the_mkl_matmul_equals_xlas_dot_with_gradients(x_shape, w_shape, in_dims, w_transposed):
    keys = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
    expected = dense_and_grads(x, w, in_dims, "xla", w_transposed)
    got = dense_and_grads(x, w, in_dims, "mkl", w_transposed)
    for name, a, b in zip(("output", "d_x", "d_w"), expected, got):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(a))), err_msg=name)


@needs_mkl
def test_the_mkl_matmul_runs_only_where_it_can():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    calls = lambda fn, *args: jax.jit(fn).lower(*args).as_text().count("layerjax_matmul")
    with one_device():
        assert calls(lambda x, w: dense(x, w, impl="mkl"), x, w) == 1
        assert calls(lambda x, w: dense(x, w, impl="xla"), x, w) == 0
        # bfloat16 activations, and a computation over all 8 devices, keep XLA's dot
        assert calls(lambda x, w: dense(x, w, impl="mkl"), x.astype(jnp.bfloat16), w) == 0
    assert calls(lambda x, w: dense(x, w, impl="mkl"), x, w) == 0


TINY = ["model.vocab_size=97", "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "data.seq_len=16", "model.max_seq_len=16", "data.batch_size=4", "mesh.num_devices=1", "optim.warmup_steps=0"]


def compiled_step(*overrides):
    cfg = load_config("default", [*TINY, *overrides])
    setup = build_setup(cfg)
    batch = next(fixed_batches(cfg, 97, 1))
    return setup, jit_train_step(setup).lower(setup.abstract_state, batch).compile(), batch


@needs_mkl
def test_a_train_step_through_mkl_equals_xlas():
    results = {}
    for impl in ("xla", "mkl"):
        setup, step, batch = compiled_step(f"model.matmul_impl={impl}")
        state, metrics = step(init_state(setup, 0), batch)
        results[impl] = jax.device_get((state.params, metrics))
    (xla_params, xla_metrics), (mkl_params, mkl_metrics) = results["xla"], results["mkl"]
    for key in ("loss", "grad_norm", "token_accuracy"):
        np.testing.assert_allclose(mkl_metrics[key], xla_metrics[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(xla_params), jax.tree.leaves(mkl_params)):
        np.testing.assert_allclose(b, a, atol=1e-5)  # Adam's first step: ~lr * sign(g)


@needs_mkl
@pytest.mark.parametrize("tied", [True, False])
def test_auto_runs_every_weight_matmul_through_mkl_on_cpu(tied):
    # Per layer 4 matmuls (q/k/v, output, MLP in, MLP out) and the head: each once forward and
    # twice backward. remat=save_dots keeps the custom calls' outputs (SAVED_NAME) as it keeps
    # dots, so a scanned stack recomputes none of them.
    _, step, _ = compiled_step(f"model.tie_embeddings={str(tied).lower()}", "model.scan_unroll=1",
                               "model.remat=save_dots")
    assert step.as_text().count('custom_call_target="layerjax_matmul"') == 3 * (4 + 1)
    _, step, _ = compiled_step("model.matmul_impl=xla")
    assert "layerjax_matmul" not in step.as_text()


def test_auto_is_xla_and_mkl_is_refused_by_name_without_mkl(monkeypatch):
    monkeypatch.setattr(matmul_cpu, "unavailable_reason", lambda: "MKL is not installed (pip install 'layerjax[mkl]')")
    assert matmul_cpu.resolve_matmul_impl(load_config("default", TINY).model) == "xla"
    with pytest.raises(ConfigError, match=r"model.matmul_impl='mkl'.*layerjax\[mkl\]"):
        matmul_cpu.resolve_matmul_impl(load_config("default", [*TINY, "model.matmul_impl=mkl"]).model)


def test_mkl_with_bfloat16_is_refused_at_load():
    with pytest.raises(ConfigError, match="model.matmul_impl='mkl' computes in float32"):
        load_config("default", [*TINY, "model.matmul_impl=mkl", "model.dtype=bfloat16"])
    assert matmul_cpu.resolve_matmul_impl(load_config("default", [*TINY, "model.dtype=bfloat16"]).model) == "xla"
