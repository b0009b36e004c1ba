"""The train state and the pure, jitted train and eval steps.

The state is a plain pytree (params as an `nnx.State`, the optax state, the step and an RNG key),
so the jitted step sees no Python objects, and the state buffers are donated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layerjax.config import Config

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("inputs", "positions", "segment_ids")
LOSS_INPUTS = (*MODEL_INPUTS, "targets", "weights")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints store it as an ordinary array


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy, log-partition (for z-loss) and argmax prediction, all [B, L]."""
    model = nnx.merge(graphdef, params)
    logits_BxLxV, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL, log_z_BxL, jnp.argmax(logits_BxLxV, axis=-1)


def _weighted_sums(graphdef, params, batch: Batch, z_loss: float):
    """Sums over weighted tokens; the caller divides by the total weight of the whole batch, so
    that microbatching gives the same loss and gradient as one big batch."""
    ce, log_z, predictions = token_losses(graphdef, params, batch)
    w = batch["weights"]
    ce_sum = jnp.sum(w * ce)
    z_sum = jnp.sum(w * jnp.square(log_z))
    stats = {"ce_sum": ce_sum, "z_sum": z_sum, "weight": jnp.sum(w),
             "correct": jnp.sum(w * (predictions == batch["targets"]))}
    return ce_sum + z_loss * z_sum, stats


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule):
    microbatches, z_loss = cfg.train.microbatches, cfg.train.z_loss
    grad_fn = jax.grad(lambda p, b: _weighted_sums(graphdef, p, b, z_loss), has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = {k: batch[k] for k in LOSS_INPUTS}
        if microbatches == 1:
            grads, stats = grad_fn(state.params, batch)
        else:
            split = lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

            def accumulate(carry, microbatch):
                grads, stats = grad_fn(state.params, microbatch)
                return jax.tree.map(jnp.add, carry, (grads, stats)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "z_sum", "weight", "correct")})
            (grads, stats), _ = jax.lax.scan(accumulate, zeros, jax.tree.map(split, batch))
        weight = jnp.maximum(stats["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        loss = stats["ce_sum"] / weight
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
        # A non-finite update never reaches the state; the loop then stops or goes on (config).
        # The step counter advances either way, so the schedule and the data stay in step.
        keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(step=state.step + 1, params=keep_old(params, state.params),
                                  opt_state=keep_old(opt_state, state.opt_state))
        metrics = {"loss": loss, "z_loss": stats["z_sum"] / weight, "grad_norm": grad_norm,
                   "lr": schedule(state.step), "token_accuracy": stats["correct"] / weight,
                   "finite": finite}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        ce, _, predictions = token_losses(graphdef, params, batch)
        w = batch["weights"]
        return {"ce_sum": jnp.sum(w * ce), "weight": jnp.sum(w), "predictions": predictions}

    return eval_step
