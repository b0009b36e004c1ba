"""The optimizer update through the CPU kernel (optim.update_impl=cpu_kernel) against optax's chain
(optim.update_impl=optax) on the same state: parameters, moments, counts and both norms, with and
without clipping, with the weight-decay mask and frozen canon weights; the non-finite guard; where
`auto` picks the kernel, and what happens where it cannot run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from layerjax.config import ConfigError, load_config
from layerjax.layers import cpu_kernels
from layerjax.sharding import activation_sharding
from layerjax.train.state import build_setup, init_state
from layerjax.train.step import apply_gradients

# Canon weights are frozen (model.canon_trainable=false): their moments move, their update is zero.
TINY_CANON = ["model.vocab_size=64", "model.num_layers=2", "model.d_model=32", "model.num_heads=2",
              "model.canon=AC", "model.canon_trainable=false", "data.seq_len=16", "model.max_seq_len=16",
              "data.batch_size=4", "optim.warmup_steps=2", "optim.weight_decay=0.3", "mesh.num_devices=1"]


def one_device():
    return activation_sharding(Mesh(np.array(jax.devices()[:1]), ("data",)), {})


def update_fn(cfg, setup, impl: str):
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, update_impl=impl))
    step = jax.jit(lambda state, grads, loss: apply_gradients(state, grads, loss, setup.tx, setup.schedule, cfg))

    def run(state, grads, loss=1.0):
        with one_device():
            return step(state, grads, jnp.float32(loss))
    return run


def random_grads(params, scale: float, seed: int):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten([scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = load_config("default", TINY_CANON)
    return cfg, build_setup(cfg)


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_kernel_update_equals_the_optax_chain(tiny_setup, clip_norm):
    cfg, setup = tiny_setup
    if clip_norm != cfg.optim.clip_norm:  # the chain (and so its state) has no clipping stage
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip_norm=clip_norm))
        setup = build_setup(cfg)
    reference, kernel = update_fn(cfg, setup, "optax"), update_fn(cfg, setup, "cpu_kernel")
    ours = theirs = init_state(setup, seed=0)
    # Small gradients, then large ones (the clip triggers when clip_norm is set), over the warmup.
    for step, scale in enumerate([1e-3, 30.0, 1e-2, 50.0]):
        grads = random_grads(ours.params, scale, seed=step)
        theirs, *norms_ref = reference(theirs, grads)
        ours, *norms = kernel(ours, grads)
        np.testing.assert_allclose(norms[:2], norms_ref[:2], rtol=2e-6)
        assert bool(norms[2]) and bool(norms_ref[2])
        # Float32 rounding apart (fused multiply-adds; a moment where gradient and history cancel
        # amplifies it): a thousandth of a step of the peak learning rate.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-3 * cfg.optim.lr), ours, theirs)
    counts = [leaf for _, leaf in optax.tree_utils.tree_get_all_with_path(ours.opt_state, "count")]
    assert [int(c) for c in counts] == [4, 4] and int(ours.step) == 4
    # Frozen canon weights never moved, decayed weights did; their moments follow the gradients.
    initial = init_state(setup, seed=0)
    canon = [k for k in jax.tree_util.tree_flatten_with_path(ours.params)[0] if "canon" in jax.tree_util.keystr(k[0])]
    assert canon and all(np.array_equal(leaf, _leaf_at(initial.params, path)) for path, leaf in canon)
    mu = optax.tree_utils.tree_get(ours.opt_state, "mu")
    assert all(np.abs(np.asarray(_leaf_at(mu, path))).max() > 0 for path, _ in canon)


def _leaf_at(tree, path):
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])[path]


@pytest.mark.parametrize("case", ["update overflows", "loss is nan"])
def test_kernel_keeps_everything_when_the_step_is_not_finite(tiny_setup, case):
    cfg, setup = tiny_setup
    if case == "update overflows":  # the loss and the gradient stay finite; the update's norm does not
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e38, warmup_steps=0))
        setup = dataclasses.replace(setup, schedule=build_setup(cfg).schedule)
    kernel = update_fn(cfg, setup, "cpu_kernel")
    state = kernel(init_state(setup, seed=0), random_grads(init_state(setup, seed=0).params, 1e-2, 0))[0]
    before = jax.device_get(state)
    after, grad_norm, update_norm, finite = kernel(state, random_grads(state.params, 1e-2, 1),
                                                   float("nan") if case == "loss is nan" else 1.0)
    assert not bool(finite) and np.isfinite(float(grad_norm))
    assert case != "update overflows" or np.isinf(float(update_norm))
    assert int(after.step) == int(before.step) + 1  # the step counter advances, nothing else does
    jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state), (before.params, before.opt_state))


def test_auto_runs_the_kernel_in_a_one_device_step_only(tiny_setup, monkeypatch):
    cfg, setup = tiny_setup
    state = init_state(setup, seed=0)
    grads = random_grads(state.params, 1e-3, 0)

    def lowered(impl: str, mesh_devices: int) -> str:
        c = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, update_impl=impl))
        fn = jax.jit(lambda s, g: apply_gradients(s, g, jnp.float32(1.0), setup.tx, setup.schedule, c))
        with activation_sharding(Mesh(np.array(jax.devices()[:mesh_devices]), ("data",)), {}):
            return fn.lower(state, grads).as_text()

    assert "layerjax_adamw_apply" in lowered("auto", 1)
    assert "layerjax_adamw_apply" not in lowered("optax", 1)
    assert "layerjax_adamw_apply" not in lowered("auto", 2)  # sharded: the kernel cannot split
    with pytest.raises(ValueError, match="optim.update_impl='cpu_kernel' cannot run here: it runs on one device, "
                                         "this computation spans 2"):
        lowered("cpu_kernel", 2)
    # Without the kernel library (no compiler), auto says so once and runs optax's chain.
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda kernel: "RuntimeError: no C++ compiler")
    with pytest.warns(UserWarning, match="CPU adamw kernel is unavailable .*no C\\+\\+ compiler"):
        assert "layerjax_adamw_apply" not in lowered("auto", 1)


def test_kernel_refuses_bfloat16_parameters_by_name():
    with pytest.raises(ConfigError, match="optim.update_impl='cpu_kernel' updates float32 parameters and "
                                          "model.param_dtype='bfloat16'"):
        load_config("default", ["optim.update_impl=cpu_kernel", "model.param_dtype=bfloat16"])
    load_config("default", ["optim.update_impl=auto", "model.param_dtype=bfloat16"])  # auto: optax there
