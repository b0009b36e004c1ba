"""Cross-entropy through the output head, whole or blockwise over the sequence (model.loss_chunk).

The float32 logits [B, L, V] are the largest tensor of a step with a big vocabulary: at 128k
tokens of vocabulary, batch 8 and length 2048 they are 8 GiB, and the backward pass keeps them
plus their gradient. Blockwise, the head runs on `chunk` positions of every row at a time inside
a `lax.map` whose body is rematerialised: the backward pass keeps only the residual stream and
recomputes each block's logits, so at most one [B, chunk, V] block (and its gradient) is alive.
Blocks cut the length axis, not the batch axis, so that a batch sharded over devices stays so.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def target_logit(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition, [B, L] each."""
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    return log_z_BxL - target_logit(logits_BxLxV, targets_BxL), log_z_BxL


def target_is_top(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Whether each target's logit is the largest, [B, L] bool: accuracy without the argmax. An
    argmax is a reduction over (index, value) pairs, which XLA:CPU does not vectorise (12 ms of
    bench_cpu's 650 ms step); a max is, and the target's logit is already gathered for the loss.
    Differs from `argmax == target` only where the target ties another token for the top logit:
    a hit here, a hit there only if the target is the tie's first index."""
    return target_logit(logits_BxLxV, targets_BxL) >= jnp.max(logits_BxLxV, axis=-1)


def head_losses(head_logits: Callable[[jax.Array], jax.Array], hidden_BxLxD: jax.Array, targets_BxL: jax.Array,
                chunk: int = 0, predict: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cross-entropy, log-partition, predictions), [B, L] each, of `head_logits` (the model's final
    norm and head) applied to the residual stream. predictions: the argmax token where `predict`,
    else `target_is_top` (what a train step's accuracy needs, for less). chunk > 0: `chunk`
    positions at a time (the last block padded); 0 or >= L: all at once. Equal either way up to
    float rounding."""
    def block(hidden, targets):
        logits = head_logits(hidden)
        ce, log_z = cross_entropy(logits, targets)
        return ce, log_z, jnp.argmax(logits, axis=-1) if predict else target_is_top(logits, targets)

    batch, length, width = hidden_BxLxD.shape
    if chunk <= 0 or chunk >= length:
        return block(hidden_BxLxD, targets_BxL)
    blocks = -(-length // chunk)
    pad = blocks * chunk - length
    # [B, L, ...] -> [blocks, B, chunk, ...]: the mapped axis leads, the batch axis stays whole.
    to_blocks = lambda a: jnp.moveaxis(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
                                       .reshape(batch, blocks, chunk, *a.shape[2:]), 1, 0)
    from_blocks = lambda a: jnp.moveaxis(a, 0, 1).reshape(batch, blocks * chunk)[:, :length]
    # Without the checkpoint the map's backward pass would save every block's logits: the whole
    # [B, L, V] again, only in pieces.
    outputs = jax.lax.map(jax.checkpoint(lambda xs: block(*xs)), (to_blocks(hidden_BxLxD), to_blocks(targets_BxL)))
    return tuple(from_blocks(a) for a in outputs)
