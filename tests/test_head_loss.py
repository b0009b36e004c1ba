"""Blockwise cross-entropy through the output head (model.loss_chunk): the same losses,
predictions and gradients as the whole-sequence head, without the [B, L, V] logits in memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerjax.config import ConfigError, load_config
from layerjax.train.head_loss import cross_entropy, head_losses, target_is_top
from layerjax.train.memory import estimate_memory
from layerjax.train.state import build_setup, init_state, jit_train_step
from multiprocess_worker import fixed_batches


def softcapped_head(weight_DxV):
    return lambda hidden: 30.0 * jnp.tanh((hidden @ weight_DxV) / 30.0)


@pytest.mark.parametrize("chunk", [4, 5, 16, 64])  # divides L, leaves a padded block, = L, > L
def test_blockwise_head_equals_whole_in_values_and_gradients(chunk):
    keys = jax.random.split(jax.random.key(0), 3)
    hidden, weight = jax.random.normal(keys[0], (3, 16, 8)), jax.random.normal(keys[1], (8, 40))
    targets = jax.random.randint(keys[2], (3, 16), 0, 40)

    def objective(hidden, weight, chunk):
        ce, log_z, predictions = head_losses(softcapped_head(weight), hidden, targets, chunk)
        return jnp.sum(ce) + 0.1 * jnp.sum(jnp.square(log_z)), (ce, log_z, predictions)

    grad = jax.grad(objective, argnums=(0, 1), has_aux=True)
    (whole_grads, whole), (block_grads, blocks) = grad(hidden, weight, 0), grad(hidden, weight, chunk)
    logits = softcapped_head(weight)(hidden)
    np.testing.assert_allclose(whole[0], cross_entropy(logits, targets)[0], rtol=1e-6)
    np.testing.assert_array_equal(whole[2], jnp.argmax(logits, -1))
    for a, b in zip((*whole, *whole_grads), (*blocks, *block_grads)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


TINY = ["model.vocab_size=97", "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "data.seq_len=16",
        "model.max_seq_len=16", "data.batch_size=4", "mesh.num_devices=1", "optim.warmup_steps=0",
        "train.z_loss=1e-3", "model.final_softcap=20", "model.tie_embeddings=false"]


def one_step(*overrides):
    cfg = load_config("default", [*TINY, *overrides])
    setup = build_setup(cfg)
    state, metrics = jit_train_step(setup)(init_state(setup, 0), next(fixed_batches(cfg, 97, 1)))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_a_train_step_with_blockwise_loss_equals_the_whole_head():
    whole_params, whole = one_step()
    block_params, blocks = one_step("model.loss_chunk=6")  # 16 = 6 + 6 + 4 (padded)
    for key in ("loss", "z_loss", "grad_norm", "token_accuracy"):
        np.testing.assert_allclose(blocks[key], whole[key], rtol=1e-5, err_msg=key)
    # Adam's first update is about lr * sign(g): a gradient entry near 0 turns rounding into up to
    # lr-sized differences, so the tolerance is absolute, well below lr (3e-3).
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(block_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_target_is_top_is_argmax_equals_target_and_counts_ties_as_hits():
    logits = jax.random.normal(jax.random.key(1), (2, 50, 7))
    targets = jax.random.randint(jax.random.key(2), (2, 50), 0, 7)
    np.testing.assert_array_equal(target_is_top(logits, targets), jnp.argmax(logits, -1) == targets)
    tied = jnp.array([[[1.0, 3.0, 3.0, 0.0]]] * 3).reshape(1, 3, 4)
    np.testing.assert_array_equal(target_is_top(tied, jnp.array([[1, 2, 3]])), [[True, True, False]])


def test_the_train_steps_accuracy_counts_targets_that_are_the_models_argmax():
    from layerjax.train.step import make_eval_step

    cfg = load_config("default", TINY)
    setup = build_setup(cfg)
    state = init_state(setup, 0)
    batch = next(fixed_batches(cfg, 97, 1))
    predictions = np.asarray(jax.jit(make_eval_step(setup.graphdef))(state.params, batch)["predictions"])
    hit = np.random.default_rng(0).random(predictions.shape) < 0.6
    weights = np.random.default_rng(1).random(predictions.shape).astype(np.float32)
    batch = dict(batch, weights=weights, targets=np.where(hit, predictions, (predictions + 1) % 97).astype(np.int32))
    _, metrics = jit_train_step(setup)(state, batch)
    assert float(metrics["token_accuracy"]) == pytest.approx(np.sum(weights * hit) / np.sum(weights), rel=1e-5)


def temp_bytes(cfg) -> int:
    setup = build_setup(cfg)
    batch = next(fixed_batches(cfg, cfg.model.vocab_size, 1))
    return jit_train_step(setup).lower(setup.abstract_state, batch).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_loss_never_holds_the_whole_logits():
    cfg = load_config("default", ["model.vocab_size=16384", "model.num_layers=1", "model.d_model=16",
                                  "model.num_heads=1", "data.seq_len=128", "model.max_seq_len=128",
                                  "data.batch_size=4", "mesh.num_devices=1"])
    logits_bytes = 4 * 128 * 16384 * 4  # float32 [B, L, V]: 32 MiB
    whole = temp_bytes(cfg)
    blocks = temp_bytes(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss_chunk=8)))
    assert whole > 2 * logits_bytes  # the logits and their gradient
    # One block's logits and gradient are 1 MiB; the rest is the vocab-sized embedding's gradient
    # and optimizer temporaries.
    assert blocks < logits_bytes / 4, (whole, blocks)
    # The config-only memory estimate counts one block too.
    estimate = lambda chunk: estimate_memory(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, loss_chunk=chunk)), device_count=1).activations
    assert estimate(0) - estimate(8) == 4 * (128 - 8) * 2 * 16384 * 4


def test_a_negative_loss_chunk_is_refused():
    with pytest.raises(ConfigError, match="model.loss_chunk"):
        load_config("default", ["model.loss_chunk=-1"])


def test_early_exit_losses_are_the_same_blockwise():
    from layerjax.train.step import token_losses

    losses = {}
    for chunk in (0, 5):
        cfg = load_config("default", [*TINY, "model.num_layers=4", "model.recursion.blocks=2",
                                      "model.recursion.exits=loops", f"model.loss_chunk={chunk}"])
        setup = build_setup(cfg)
        batch = {k: jnp.asarray(v) for k, v in next(fixed_batches(cfg, 97, 1)).items()}
        ce, log_z, predictions, _, exits = token_losses(setup.graphdef, init_state(setup, 0).params, batch)
        losses[chunk] = (ce, log_z, predictions, exits["ce"], exits["predictions"])
    assert losses[0][3].shape == (1, 4, 16)  # one exit, after the first loop
    for whole, blocks in zip(losses[0], losses[5]):
        np.testing.assert_allclose(whole, blocks, rtol=1e-5, atol=1e-6)
