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

from layerjax.config import Config, exit_weights, recursion_exits
from layerjax.model.transformer import router_stats
from layerjax.train import adamw_kernel
from layerjax.train.head_loss import head_losses
from layerjax.train.optimizer import frozen_kinds

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("inputs", "positions", "segment_ids")
LOSS_INPUTS = (*MODEL_INPUTS, "targets", "weights")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: nnx.State
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints store it as an ordinary array


def is_adapter_path(path, _=None) -> bool:
    """Whether a parameter path lies in an adapter or a router (where LoRAParam and RouterParam
    live); by path, so that it also splits trees of shardings or shapes."""
    return any(getattr(key, "key", key) in ("adapters", "router") for key in path)


def split_trainable(params: nnx.State, m) -> tuple[nnx.State, nnx.State | None]:
    """(trainable, frozen), for params or any tree shaped like them (shardings, shapes). With
    adapters (model.adapter.kind != none) only the LoRA and router weights train: the base is
    frozen, gets no gradient at all and no optimizer state."""
    if m.adapter.kind == "none":
        return params, None
    return nnx.split_state(params, is_adapter_path, ...)


def join_trainable(trainable: nnx.State, frozen: nnx.State | None) -> nnx.State:
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, dropout_key: jax.Array | None = None,
                 predict: bool = True):
    """Per-token cross-entropy, log-partition (for z-loss) and argmax prediction (with
    predict=False: whether the target is the top logit, see `target_is_top`), all [B, L], the
    router statistics per segment with LoRA experts (see `router_stats`), and for a model with
    early exits (model.recursion.exits) their cross-entropy and predictions, [exits, B, L] each
    (else None): the stream after each exit depth read out by the shared head. The head runs
    model.loss_chunk positions at a time (see `head_losses`)."""
    model = nnx.merge(graphdef, params)
    has_exits = bool(recursion_exits(model.config))
    chunk = model.config.loss_chunk
    hidden_BxLxD, _, hidden_ExBxLxD = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                                                    probe="exits" if has_exits else None, dropout_key=dropout_key,
                                                    apply_head=False)
    ce_BxL, log_z_BxL, predictions_BxL = head_losses(model.head_logits, hidden_BxLxD, batch["targets"], chunk,
                                                     predict)
    exits = None
    if has_exits:
        def exit_loss(hidden_BxLxD):
            ce, _, predictions = head_losses(model.head_logits, hidden_BxLxD, batch["targets"], chunk, predict)
            return ce, predictions

        # One exit at a time, so that only one exit's logits are alive at once.
        ce_ExBxL, predictions_ExBxL = jax.lax.map(exit_loss, hidden_ExBxLxD)
        exits = {"ce": ce_ExBxL, "predictions": predictions_ExBxL}
    return ce_BxL, log_z_BxL, predictions_BxL, router_stats(model), exits


def exit_objective(ce_sum: jax.Array, exit_ce_sums: jax.Array, weights) -> jax.Array:
    """The trained loss with early exits: (CE_last + sum_e w_e CE_e) / (1 + sum_e w_e), each CE a
    weighted token sum (the caller divides by the batch's token weight)."""
    w = jnp.asarray(weights, jnp.float32)
    return (ce_sum + jnp.sum(w * exit_ce_sums)) / (1.0 + jnp.sum(w))


def _weighted_sums(graphdef, params, batch: Batch, cfg: Config, dropout_key=None):
    """Sums over weighted tokens; the caller divides by the total weight of the whole batch, so
    that microbatching gives the same loss and gradient as one big batch. The router losses are
    per batch, so they enter weighted by this batch's token weight."""
    ce, log_z, target_is_top, routers, exits = token_losses(graphdef, params, batch, dropout_key, predict=False)
    w = batch["weights"]
    ce_sum = jnp.sum(w * ce)
    z_sum = jnp.sum(w * jnp.square(log_z))
    weight = jnp.sum(w)
    stats = {"ce_sum": ce_sum, "z_sum": z_sum, "weight": weight,
             "correct": jnp.sum(w * target_is_top)}
    total = ce_sum + cfg.train.z_loss * z_sum
    if exits is not None:  # the last layer's CE and each exit's, weighted (model.recursion.exit_weights)
        exit_ce_sums = jnp.sum(w * exits["ce"], axis=(1, 2))
        total = exit_objective(ce_sum, exit_ce_sums, exit_weights(cfg.model)) + cfg.train.z_loss * z_sum
        stats.update(exit_ce_sums=exit_ce_sums, objective_sum=total - cfg.train.z_loss * z_sum)
    if routers:  # per layer: balance summed over layers, router z-loss averaged
        balance = sum(jnp.sum(r["balance"]) for r in routers)
        router_z = sum(jnp.sum(r["z"]) for r in routers) / sum(r["z"].shape[0] for r in routers)
        a = cfg.model.adapter
        total = total + (a.balance_loss * balance + a.router_z_loss * router_z) * weight
        stats.update(balance_sum=balance * weight, router_z_sum=router_z * weight,
                     # per segment [layers, experts] and [layers], for the usage log and heatmap
                     usage_sums=[r["assigned"] * weight for r in routers],
                     entropy_sums=[r["entropy"] * weight for r in routers])
    return total, stats


def apply_gradients(state: TrainState, grads: nnx.State, loss: jax.Array, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: Config) -> tuple[TrainState, jax.Array, jax.Array, jax.Array]:
    """The optimizer's half of the train step: `grads` (of the trainable parameters, already
    averaged) through `tx` into the parameters, unless the loss, the gradients or the update are
    not finite. Returns (new state, gradient norm, update norm, finite). optim.update_impl picks
    optax's chain or the CPU kernel (adamw_kernel.py), which computes the same update on the
    same optimizer state."""
    trainable, frozen = split_trainable(state.params, cfg.model)
    if adamw_kernel.use_kernel(cfg.optim, trainable):
        trainable, opt_state, grad_norm, update_norm, finite = adamw_kernel.apply_adamw(
            cfg.optim, schedule, frozen_kinds(cfg), trainable, grads, state.opt_state, loss)
        return (state.replace(step=state.step + 1, params=join_trainable(trainable, frozen), opt_state=opt_state),
                grad_norm, update_norm, finite)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = join_trainable(optax.apply_updates(trainable, updates), frozen)
    update_norm = optax.global_norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    # A non-finite update never reaches the state; the loop then stops or goes on (config).
    # The step counter advances either way, so the schedule and the data stay in step.
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype), new, old)
    new_state = state.replace(step=state.step + 1, params=keep_old(params, state.params),
                              opt_state=keep_old(opt_state, state.opt_state))
    return new_state, grad_norm, update_norm, finite


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule):
    microbatches = cfg.train.microbatches
    # Differentiated with respect to the trainable part only: a frozen base costs no gradient.
    grad_fn = jax.grad(lambda trainable, frozen, b, key: _weighted_sums(
        graphdef, join_trainable(trainable, frozen), b, cfg, key), has_aux=True)
    use_dropout = cfg.model.adapter.kind != "none" and cfg.model.adapter.dropout > 0

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = {k: batch[k] for k in LOSS_INPUTS}
        trainable, frozen = split_trainable(state.params, cfg.model)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if use_dropout else None
        if microbatches == 1:
            grads, stats = grad_fn(trainable, frozen, batch, key)
        else:
            split = lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

            def accumulate(carry, indexed):
                index, microbatch = indexed
                sub_key = None if key is None else jax.random.fold_in(key, index)
                grads, stats = grad_fn(trainable, frozen, microbatch, sub_key)
                return jax.tree.map(jnp.add, carry, (grads, stats)), None

            _, zero_stats = jax.eval_shape(lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[:1], batch), key))
            zeros = (jax.tree.map(jnp.zeros_like, trainable), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats))
            (grads, stats), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), jax.tree.map(split, batch)))
        weight = jnp.maximum(stats["weight"], 1.0)
        # Each gradient keeps its parameter's dtype: a float32 weight would promote bfloat16
        # gradients, and with them the AdamW moments, so the state's types would change after
        # one step (a second compile, and float32 moments for bfloat16 parameters).
        grads = jax.tree.map(lambda g: (g / weight).astype(g.dtype), grads)
        loss = stats["ce_sum"] / weight
        new_state, grad_norm, update_norm, finite = apply_gradients(state, grads, loss, tx, schedule, cfg)
        metrics = {"loss": loss, "z_loss": stats["z_sum"] / weight, "grad_norm": grad_norm,
                   "update_norm": update_norm, "lr": schedule(state.step), "token_accuracy": stats["correct"] / weight,
                   "finite": finite}
        if "exit_ce_sums" in stats:  # "loss" stays the last layer's CE, comparable across runs
            metrics.update(objective=stats["objective_sum"] / weight,
                           **{f"loss_exit{d}": stats["exit_ce_sums"][i] / weight
                              for i, d in enumerate(recursion_exits(cfg.model))})
        if "balance_sum" in stats:
            metrics.update(router_balance=stats["balance_sum"] / weight, router_z=stats["router_z_sum"] / weight,
                           expert_usage=[u / weight for u in stats["usage_sums"]],
                           router_entropy=[e / weight for e in stats["entropy_sums"]])
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef):
    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        ce, _, predictions, _, exits = token_losses(graphdef, params, batch)
        w = batch["weights"]
        out = {"ce_sum": jnp.sum(w * ce), "weight": jnp.sum(w), "predictions": predictions}
        if exits is not None:  # per exit: CE sum [exits] and predictions [exits, B, L]
            out.update(exit_ce_sums=jnp.sum(w * exits["ce"], axis=(1, 2)), exit_predictions=exits["predictions"])
        return out

    return eval_step
