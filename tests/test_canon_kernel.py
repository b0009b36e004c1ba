"""The one-pass CPU canon kernel (model.canon_impl=cpu_kernel) against the pure-JAX form: outputs
and gradients of input, taps and bias for every option, packed documents, the generic path for
long kernels, several row chunks; where `auto` picks it; and what happens where it cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from layerjax.config import ConfigError, load_config
from layerjax.layers import canon_kernel
from layerjax.layers.canon import Canon
from layerjax.sharding import activation_sharding


def one_device():
    """Traces as the train step of a one-device mesh does (the tests' process has 8 devices)."""
    return activation_sharding(Mesh(np.array(jax.devices()[:1]), ("data",)), {})


def layer_pair(dim, kernel, **options):
    options = dict(residual=True, use_bias=False, activation=False) | options
    make = lambda impl: Canon(dim, kernel, axis_name=None, rngs=nnx.Rngs(0), impl=impl, **options)
    return make("xla"), make("cpu_kernel")


def value_and_grads(layer, h, segments):
    def loss(layer, h):
        out, _ = layer(h, segments)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1])), out

    with one_device():
        (_, out), (grads, dh) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, h)
    return out, dh, {path: np.asarray(v) for path, v in nnx.to_flat_state(grads)}


# Width 20 and 3 x 100 rows: 4 row chunks, rows that straddle chunk edges; kernel 9 runs the
# generic (non-unrolled) tap loop, kernel 1 the residual plus a single tap.
CASES = [dict(kernel=4), dict(kernel=4, residual=False), dict(kernel=3, use_bias=True, activation=True),
         dict(kernel=4, activation=True, residual=False), dict(kernel=1), dict(kernel=9, use_bias=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("packed", [False, True])
def test_kernel_equals_the_jax_form(case, packed):
    case = dict(case)
    reference, kernel = layer_pair(20, case.pop("kernel"), **case)
    h = jax.random.normal(jax.random.key(0), (3, 100, 20))
    # Documents that end, restart and recur (the mask compares ids token by token), and padding.
    row = np.repeat([1, 2, 2, 3, 1, 4, 0], [9, 20, 1, 30, 15, 20, 5])
    segments = jnp.asarray(np.stack([row, np.roll(row, 7), np.ones_like(row)])) if packed else None
    out_ref, dh_ref, grads_ref = value_and_grads(reference, h, segments)
    out, dh, grads = value_and_grads(kernel, h, segments)
    np.testing.assert_allclose(out, out_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for path in grads:
        np.testing.assert_allclose(grads[path], grads_ref[path], rtol=1e-5, atol=1e-4, err_msg=str(path))


def test_kernel_is_deterministic_and_causal():
    _, kernel = layer_pair(20, 4)
    h = jax.random.normal(jax.random.key(1), (2, 300, 20))
    first = value_and_grads(kernel, h, None)
    again = value_and_grads(kernel, h, None)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)  # fixed chunks, partial sums added in order
    with one_device():
        changed, _ = kernel(h.at[:, 150].add(1.0))
    np.testing.assert_array_equal(changed[:, :150], first[0][:, :150])
    assert not np.allclose(changed[:, 150:154], first[0][:, 150:154])
    np.testing.assert_array_equal(changed[:, 154:], first[0][:, 154:])  # 4 taps: 150..153 see it


def canon_targets(jaxpr) -> set[str]:
    return {t for t in ("layerjax_canon_forward", "layerjax_canon_backward") if t in str(jaxpr)}


def test_auto_runs_the_kernel_in_a_one_device_step_only():
    from layerjax.train.state import build_setup, init_state, jit_train_step
    from multiprocess_worker import fixed_batches

    def step_hlo(*overrides):
        cfg = load_config("default", ["model.vocab_size=64", "model.num_layers=2", "model.d_model=32",
                                      "model.canon=ABCD", "data.seq_len=16", "model.max_seq_len=16",
                                      "data.batch_size=4", *overrides])
        setup = build_setup(cfg)
        batch = next(iter(fixed_batches(cfg, 64, steps=1)))
        return jit_train_step(setup).lower(init_state(setup, seed=0), batch).as_text()

    assert canon_targets(step_hlo("mesh.num_devices=1")) == {"layerjax_canon_forward", "layerjax_canon_backward"}
    assert canon_targets(step_hlo("mesh.num_devices=1", "model.canon_impl=xla")) == set()
    # Sharded over two devices the JAX form runs: XLA cannot split an opaque call.
    assert canon_targets(step_hlo("mesh.num_devices=2")) == set()


def test_cpu_kernel_where_it_cannot_run_says_why():
    _, kernel = layer_pair(8, 4)
    h = jnp.ones((2, 5, 8))
    with pytest.raises(ValueError, match="cannot run here: it runs on one device, this computation spans 8"):
        kernel(h)  # outside a one-device step, on the tests' 8 devices
    with one_device(), pytest.raises(ValueError, match="it computes in float32, the activations are bfloat16"):
        kernel(h.astype(jnp.bfloat16))
    with pytest.raises(ConfigError, match="model.canon_impl='cpu_kernel' computes in float32"):
        load_config("default", ["model.canon_impl=cpu_kernel", "model.dtype=bfloat16"])


def test_without_a_compiler_auto_falls_back_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERJAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler\\+\\+' on PATH"):
        canon_kernel._build()
    monkeypatch.setenv("CXX", "false")  # a compiler that fails, with and without -march=native
    with pytest.raises(RuntimeError, match="false -O3 .*canon_cpu.cc failed"):
        canon_kernel._build()
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
    monkeypatch.setattr(canon_kernel, "_load", lambda: "RuntimeError: no C++ compiler")
    _, auto = layer_pair(8, 4)
    auto.impl = "auto"
    h = jax.random.normal(jax.random.key(2), (2, 5, 8))
    with one_device(), pytest.warns(UserWarning, match="canon kernel is unavailable .*no C\\+\\+ compiler"):
        jaxpr = jax.make_jaxpr(lambda h: auto(h)[0])(h)
    assert canon_targets(jaxpr) == set()
