"""Per-layer diagnostics of a model, the quantities the Mix-LN and Curse-of-Depth papers plot:

- during training (every `logging.layer_stats_every` steps): each layer's gradient norm (total
  and per sublayer) and residual-stream statistics after it (RMS, variance, max |x|, angular
  distance to its input), from one forward/backward pass whose per-layer values are scan outputs;
- at eval (`logging.layer_eval`): the angular distance between the hidden states of every pair of
  layers, and each layer's removal sensitivity (validation loss with that layer replaced by the
  identity, minus the full model's loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerjax.model.plan import Plan

# Which sublayer a block attribute belongs to, for per-sublayer gradient norms.
SUBLAYER_OF = {"attn_norm": "attention", "canon_a": "attention", "attn": "attention", "attn_out_norm": "attention",
               "mlp_norm": "mlp", "canon_c": "mlp", "mlp": "mlp", "mlp_out_norm": "mlp"}  # relax.attn / relax.mlp too


def per_layer_grad_norms(grads: nnx.State, plan: Plan) -> dict[str, jax.Array]:
    """{"grad_norm", "grad_norm_attention", "grad_norm_mlp"}: one L2 norm per layer, [num_layers].

    Layer parameters sit in per-segment stacks with a leading `layers` axis, so each stacked leaf
    gives every layer of its segment at once; segments are concatenated in depth order. A shared
    block's gradient (summed over the depths that run it) is shown at each of those depths."""
    sums = {name: [jnp.zeros(s.num_layers) for s in plan.segments] for name in ("total", "attention", "mlp")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys[0] != "stacks":
            continue  # embeddings, final norm, head: not part of any layer
        segment, attribute = keys[1], keys[3]
        squares = jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim)))
        blocks = plan.segments[segment].blocks
        if blocks is not None and keys[2] == "blocks":  # a shared block: shown at every depth that runs it
            squares = squares[jnp.asarray(blocks)]
        sums["total"][segment] = sums["total"][segment] + squares
        group = SUBLAYER_OF.get(attribute)
        if group is not None:
            sums[group][segment] = sums[group][segment] + squares
    names = {"total": "grad_norm", "attention": "grad_norm_attention", "mlp": "grad_norm_mlp"}
    return {names[k]: jnp.sqrt(jnp.concatenate(v)) for k, v in sums.items()}


def make_layer_stats_step(graphdef: nnx.GraphDef, plan: Plan):
    """(params, batch) -> {name: [num_layers] array}: per-layer gradient norms of the mean
    token loss on the batch, and the residual-stream statistics of `residual_stats`."""

    def loss_and_stats(params, batch):
        logits, _, stats = nnx.merge(graphdef, params).forward(
            batch["inputs"], batch["positions"], batch["segment_ids"], probe="stats")
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        w = batch["weights"]
        return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0), stats

    def layer_stats(params, batch):
        grads, stats = jax.grad(loss_and_stats, has_aux=True)(params, batch)
        return {**per_layer_grad_norms(grads, plan), **stats}

    return layer_stats


def angular_distance_matrix(hidden_NxBxLxD: jax.Array) -> jax.Array:
    """[N, N]: entry (i, j) is arccos(cos(h_i, h_j)) / pi averaged over tokens, for the N hidden
    states (the embedding output, then each layer's output)."""
    h = hidden_NxBxLxD.astype(jnp.float32).reshape(hidden_NxBxLxD.shape[0], -1, hidden_NxBxLxD.shape[-1])
    unit = h * jax.lax.rsqrt(jnp.sum(h * h, -1, keepdims=True) + 1e-30)
    cos_NxNxT = jnp.einsum("itd,jtd->ijt", unit, unit)
    return jnp.mean(jnp.arccos(jnp.clip(cos_NxNxT, -1.0, 1.0)), -1) / jnp.pi


def make_layer_eval_steps(graphdef: nnx.GraphDef):
    """Two jitted functions for eval-time diagnostics:
    hidden_distances(params, batch) -> [L+1, L+1] angular distances between all hidden states;
    loss_without(params, batch, layer) -> (weighted loss sum, weight) with `layer` skipped
    (layer = -1 skips nothing). The layer index is traced: one compilation serves every layer."""

    @jax.jit
    def hidden_distances(params, batch):
        _, _, hidden = nnx.merge(graphdef, params).forward(
            batch["inputs"], batch["positions"], batch["segment_ids"], probe="hidden")
        return angular_distance_matrix(hidden)

    @jax.jit
    def loss_without(params, batch, layer):
        logits, _, _ = nnx.merge(graphdef, params).forward(
            batch["inputs"], batch["positions"], batch["segment_ids"], skip_layer=layer)
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(batch["weights"] * ce), jnp.sum(batch["weights"])

    return hidden_distances, loss_without


def layer_eval(steps, params, batches: list, num_layers: int, heatmap_batches: int = 2) -> dict:
    """Runs the eval-time diagnostics over (global) eval batches. Returns plain lists:
    angular_distance_matrix [[L+1]*(L+1)] (mean over the first `heatmap_batches` batches),
    removal_delta [L] (loss without layer l minus the full loss), and full_loss."""
    hidden_distances, loss_without = steps
    matrices = [np.asarray(hidden_distances(params, b)) for b in batches[:heatmap_batches]]

    def loss(layer: int) -> float:
        sums = [loss_without(params, b, jnp.int32(layer)) for b in batches]
        return float(sum(s for s, _ in sums)) / max(float(sum(w for _, w in sums)), 1.0)

    full = loss(-1)
    return {"angular_distance_matrix": np.mean(matrices, axis=0).round(5).tolist(),
            "removal_delta": [loss(layer) - full for layer in range(num_layers)],
            "full_loss": full}
