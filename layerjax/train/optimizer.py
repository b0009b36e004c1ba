"""Optax AdamW with global-norm clipping, a weight-decay mask, and the learning-rate schedules."""

from __future__ import annotations

import jax
import optax

from layerjax.config import OptimConfig


def lr_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to lr, then: cosine or linear decay to min_lr_ratio*lr, constant, or
    warmup-stable-decay (constant until the last decay_fraction of steps, then linear decay)."""
    warmup = min(o.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    final = o.lr * o.min_lr_ratio
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, rest, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.lr, final, rest)
    elif o.schedule == "constant":
        after = optax.constant_schedule(o.lr)
    else:  # wsd
        decay = max(int(round(rest * o.decay_fraction)), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, final, decay)], [rest - decay])
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), after], [warmup])


def param_kinds(path: tuple) -> set[str]:
    """What a parameter is, from its path in the model: "norm", "bias", "embed" and/or "canon"."""
    # Only dict/sequence keys name modules and parameters; the trailing `.value` attribute of
    # an nnx Variable (a GetAttrKey) does not.
    names = [str(p.key if hasattr(p, "key") else p.idx) for p in path if hasattr(p, "key") or hasattr(p, "idx")]
    leaf = names[-1] if names else ""
    kinds = set()
    if any(n.endswith("norm") for n in names):
        kinds.add("norm")
    if leaf == "bias" or leaf in ("bq", "bk", "bv", "bo", "b_in", "b_out"):
        kinds.add("bias")
    if names and names[0] in ("embed", "positions"):
        kinds.add("embed")
    if any(n.startswith("canon_") for n in names):
        kinds.add("canon")
    return kinds


def kinds_mask(params, kinds: tuple[str, ...]):
    """True for every parameter that is any of `kinds`."""
    wanted = set(kinds)
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(param_kinds(path) & wanted), params)


def decay_mask(params, no_decay: tuple[str, ...]):
    """True where weight decay applies: every parameter whose kinds avoid `no_decay`."""
    return jax.tree.map(lambda excluded: not excluded, kinds_mask(params, no_decay))


def frozen_kinds(cfg) -> tuple[str, ...]:
    """Parameter kinds that train with a zero update: canon weights unless model.canon_trainable."""
    return () if cfg.model.canon_trainable else ("canon",)


def build_optimizer(o: OptimConfig, total_steps: int, frozen: tuple[str, ...] = ()
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping); parameters of a `frozen` kind (e.g. "canon") never change: no decay,
    and their updates are set to zero."""
    schedule = lr_schedule(o, total_steps)
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=lambda params: decay_mask(params, (*o.no_decay, *frozen)))
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
    parts.append(adamw)
    if frozen:
        parts.append(optax.masked(optax.set_to_zero(), lambda params: kinds_mask(params, frozen)))
    return (optax.chain(*parts) if len(parts) > 1 else adamw), schedule
