"""The C++ CPU kernels against the pure-JAX forms they replace. Canon (model.canon_impl=cpu_kernel):
outputs and gradients of input, taps and bias for every option, packed documents, the generic path
for long kernels, several row chunks. Attention (model.attention_impl=cpu_kernel): outputs and
gradients of q, k, v with documents, windows, grouped queries and softcaps. For both: where `auto`
picks them, and what happens where they cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from layerjax.config import ConfigError, load_config
from layerjax.layers import cpu_kernels
from layerjax.layers.attention_kernels import TokenCoords, attend, resolve_attention_impl
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


TARGETS = ("layerjax_canon_forward", "layerjax_canon_backward", "layerjax_attention_forward",
           "layerjax_attention_backward")


def kernel_calls(program) -> dict[str, int]:
    """How often each kernel is called in a jaxpr or a lowered program."""
    return {t: str(program).count(t) for t in TARGETS if t in str(program)}


def test_auto_runs_the_kernels_in_a_one_device_step_only():
    from layerjax.train.state import build_setup, init_state, jit_train_step
    from multiprocess_worker import fixed_batches

    def step_hlo(*overrides):
        cfg = load_config("default", ["model.vocab_size=64", "model.num_layers=2", "model.d_model=32",
                                      "model.num_heads=2", "model.canon=ABCD", "data.seq_len=16", "model.max_seq_len=16",
                                      "data.batch_size=4", "model.scan_unroll=1", *overrides])
        setup = build_setup(cfg)
        batch = next(iter(fixed_batches(cfg, 64, steps=1)))
        return jit_train_step(setup).lower(init_state(setup, seed=0), batch).as_text()

    # One scan over both layers: each kernel appears once in its body. One attention forward means
    # the remat policy kept the kernel's output: the backward pass does not rerun it.
    calls = kernel_calls(step_hlo("mesh.num_devices=1"))
    assert calls["layerjax_attention_forward"] == calls["layerjax_attention_backward"] == 1
    assert calls["layerjax_canon_forward"] >= 4 and calls["layerjax_canon_backward"] == 4
    # Sharded over two devices the JAX forms run: XLA cannot split an opaque call.
    assert kernel_calls(step_hlo("mesh.num_devices=2")) == {}


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
        cpu_kernels._build()
    monkeypatch.setenv("CXX", "false")  # a compiler that fails, with and without -march=native
    with pytest.raises(RuntimeError, match="false -O3 .*canon_cpu.cc .*attention_cpu.cc .*adamw_cpu.cc .*matmul_cpu.cc failed"):
        cpu_kernels._build()
    assert not list(tmp_path.iterdir())  # nothing half-built left behind
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda kernel: "RuntimeError: no C++ compiler")
    _, auto = layer_pair(8, 4)
    auto.impl = "auto"
    h = jax.random.normal(jax.random.key(2), (2, 5, 8))
    with one_device(), pytest.warns(UserWarning, match="CPU canon kernel is unavailable .*no C\\+\\+ compiler"):
        jaxpr = jax.make_jaxpr(lambda h: auto(h)[0])(h)
    assert kernel_calls(jaxpr) == {}
    q = jnp.ones((1, 2, 5, 16))
    coords = TokenCoords(jnp.arange(5)[None], jnp.arange(5)[None])
    with one_device(), pytest.warns(UserWarning, match="CPU attention kernel is unavailable"):
        jaxpr = jax.make_jaxpr(lambda q: attend("cpu_kernel", q, q, q, coords, coords, None, self_attention=True))(q)
    assert kernel_calls(jaxpr) == {}


def attention_inputs(batch=2, heads=4, kv_heads=2, length=37, dim=16, packed=True, seed=0):
    kq, kk, kv_, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, heads, length, dim))
    k, v = (jax.random.normal(key, (batch, kv_heads, length, dim)) for key in (kk, kv_))
    weights = jax.random.normal(kw, q.shape)  # a loss that weighs every output differently
    if packed:  # three documents per row, positions restarting in each
        bounds = [0, length // 3, length // 3 + length // 4, length]
        segment = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
        position = np.concatenate([np.arange(b - a) for a, b in zip(bounds, bounds[1:])])
        coords = TokenCoords(jnp.arange(length)[None], jnp.asarray(position)[None], jnp.asarray(segment)[None])
    else:
        coords = TokenCoords(jnp.arange(length)[None], jnp.arange(length)[None])
    return q, k, v, weights, coords


def attention_value_and_grads(impl, q, k, v, weights, coords, window=None, **options):
    def loss(q, k, v):
        out = attend(impl, q, k, v, coords, coords, window, self_attention=True, **options)
        return jnp.sum(out * weights), out

    with one_device():
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


# Grouped queries (4 heads, 2 kv heads) over 37 tokens in three documents; with a window, a softcap
# and an explicit scale; without documents at head dim 32 and equal head counts.
ATTENTION_CASES = [dict(), dict(window=5, logit_cap=2.0, scale=0.3),
                   dict(packed=False, length=64, dim=32, heads=3, kv_heads=3)]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_attention_kernel_equals_the_reference(case):
    case = dict(case)
    window = case.pop("window", None)
    options = {key: case.pop(key) for key in ("logit_cap", "scale") if key in case}
    q, k, v, weights, coords = attention_inputs(**case)
    with one_device():
        assert kernel_calls(jax.make_jaxpr(lambda q: attend("cpu_kernel", q, k, v, coords, coords, window,
                                                            self_attention=True, **options))(q))
    out_ref, grads_ref = attention_value_and_grads("xla", q, k, v, weights, coords, window, **options)
    out, grads = attention_value_and_grads("cpu_kernel", q, k, v, weights, coords, window, **options)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, got, expected in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_attention_kernel_only_where_it_applies():
    q, k, v, _, coords = attention_inputs()
    run = lambda impl, q, **kw: jax.make_jaxpr(
        lambda q: attend(impl, q, k.astype(q.dtype), v.astype(q.dtype), coords, coords, None, **kw))(q)
    assert not kernel_calls(run("cpu_kernel", q, self_attention=True))  # 8 devices: causal_blocks
    with one_device():
        assert not kernel_calls(run("cpu_kernel", q, self_attention=False))  # decoding: the reference
        assert not kernel_calls(run("cpu_kernel", q.astype(jnp.bfloat16), self_attention=True))
    model = lambda *o: load_config("bench_cpu", list(o)).model
    assert resolve_attention_impl(model()) == "cpu_kernel"
    assert resolve_attention_impl(model("model.dtype=bfloat16")) == "causal_blocks"
    assert resolve_attention_impl(model("model.head_dim=24")) == "causal_blocks"
    with pytest.raises(ConfigError, match="attention_impl='cpu_kernel' computes in float32 with a head dim"):
        load_config("bench_cpu", ["model.attention_impl=cpu_kernel", "model.head_dim=24"])
