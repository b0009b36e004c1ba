"""Canon layers: the equation, zero weights, init range, causality, no mixing across packed
documents, and step-by-step decoding == full forward with canon at all four positions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import ConfigError, ModelConfig, load_config
from layerjax.layers.canon import Canon
from layerjax.model.transformer import Transformer

CANON = ModelConfig(vocab_size=61, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=32,
                    canon="ABCD", layer_norms=("0:post",))


def canon(dim=6, kernel=4, residual=True, **kw):
    kw = dict(use_bias=False, activation=False, axis_name=None) | kw
    return Canon(dim, kernel, residual=residual, rngs=nnx.Rngs(0), **kw)


def test_canon_equals_its_equation():
    layer = canon()
    h = np.random.default_rng(0).normal(size=(2, 9, 6)).astype(np.float32)
    w = np.asarray(layer.weight[...])
    expected = h.copy()
    for t in range(9):
        for i in range(4):
            if t - i >= 0:
                expected[:, t] += w[i] * h[:, t - i]
    np.testing.assert_allclose(layer(jnp.asarray(h))[0], expected, rtol=1e-5, atol=1e-6)


def test_zero_weights_give_zeros_or_identity():
    h = jax.random.normal(jax.random.key(1), (2, 7, 6))
    for residual, expected in ((False, jnp.zeros_like(h)), (True, h)):
        layer = canon(residual=residual)
        layer.weight[...] = jnp.zeros_like(layer.weight[...])
        np.testing.assert_array_equal(layer(h)[0], expected)


def test_init_range_is_pytorch_conv1d_default():
    w = np.asarray(canon(dim=4096, kernel=4).weight[...])
    assert np.abs(w).max() <= 0.5 and np.abs(w).max() > 0.49  # uniform(+-1/sqrt(K))
    assert abs(w.mean()) < 0.01 and w.std() == pytest.approx(0.5 / np.sqrt(3), rel=0.02)


def test_canon_respects_document_boundaries():
    layer = canon()
    h = jax.random.normal(jax.random.key(2), (1, 8, 6))
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    packed, _ = layer(h, segments)
    second_alone, _ = layer(h[:, 3:7])
    np.testing.assert_allclose(packed[:, 3:7], second_alone, rtol=1e-6)


def test_model_with_canon_everywhere_is_causal_and_isolates_documents():
    model = Transformer(CANON, nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(3), (2, 12), 0, 61)
    a, _ = model(toks)
    b, _ = model(toks.at[:, 7].set((toks[:, 7] + 1) % 61))
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])
    segments = jnp.array([[1] * 5 + [2] * 7] * 2)
    positions = jnp.array([list(range(5)) + list(range(7))] * 2)
    packed, _ = model(toks, positions, segments)
    alone, _ = model(toks[:, 5:], positions[:, 5:], segments[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], alone, rtol=1e-5, atol=1e-5)


# The gated MLP (canon D over the concatenated gate and up projections) runs by default; the
# plain GELU MLP takes the same cached path at another width, under -m slow.
@pytest.mark.parametrize("mlp", ["swiglu", pytest.param("gelu", marks=pytest.mark.slow)])
def test_decoding_with_canon_equals_full_forward(mlp):
    model = Transformer(dataclasses.replace(CANON, mlp=mlp, qk_norm=True), nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(4), (2, 10), 0, 61)
    full, _ = model(toks)
    cache = model.init_cache(batch=2, max_len=16)
    logits, cache = model(toks[:, :3], cache=cache, cache_index=jnp.int32(0))
    steps = [logits]
    for t in range(3, 10):
        logits, cache = model(toks[:, t:t + 1], cache=cache, cache_index=jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


def test_plan_and_config():
    model = Transformer(CANON, nnx.Rngs(0))
    assert {s.spec.canon for s in model.plan.segments} == {"ABCD"}
    assert "ABCD" in model.plan.table()
    assert load_config("default", ["model.canon=CA"]).model.canon == "CA"
    with pytest.raises(ConfigError, match="model.canon='AX' must be distinct letters from 'ABCD'"):
        load_config("default", ["model.canon=AX"])


@pytest.mark.parametrize("trainable", [True, False])
def test_frozen_canon_weights_never_change(trainable):
    from layerjax.train.state import build_setup, init_state, jit_train_step
    from multiprocess_worker import fixed_batches

    cfg = load_config("default", ["model.vocab_size=64", "model.num_layers=2", "model.d_model=32", "model.canon=ABCD",
                                  "model.canon_bias=true", f"model.canon_trainable={trainable}", "data.seq_len=16",
                                  "model.max_seq_len=16", "data.batch_size=4", "mesh.num_devices=1",
                                  "optim.warmup_steps=0", "optim.weight_decay=0.5"])
    setup = build_setup(cfg)
    state = init_state(setup, seed=0)
    before = jax.tree.map(np.asarray, state.params)
    step = jit_train_step(setup)
    for batch in fixed_batches(cfg, 64, steps=3):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    blocks_before, blocks_after = before["stacks"][0]["blocks"], state.params["stacks"][0]["blocks"]
    canon = [blocks_before["canon_a"], blocks_before["attn"]["canon_b"], blocks_before["canon_c"],
             blocks_before["mlp"]["canon_d"]]
    canon_after = [blocks_after["canon_a"], blocks_after["attn"]["canon_b"], blocks_after["canon_c"],
                   blocks_after["mlp"]["canon_d"]]
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(canon), jax.tree.leaves(canon_after))]
    assert all(changed) if trainable else not any(changed)
    assert not np.array_equal(blocks_before["attn"]["wq"], np.asarray(blocks_after["attn"]["wq"]))
