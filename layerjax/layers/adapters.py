"""Low-rank adapters on a projection: LoRA, and mixtures of LoRA experts (MoLA, MoLE).

One module serves every low-rank idea in the project. For a projection y = W x it computes the
delta that is added to y:

    LoRA:     delta = s * B A dropout(x)                                  (s = alpha / r, or alpha / sqrt(r))
    experts:  delta = sum_{i in top-k} g_i(x) * s * B_i A_i dropout(x)   (g from a router on x)

A starts like peft's (kaiming-uniform with a = sqrt(5): uniform(+-1/sqrt(d_in))) and B at zero, so a
fresh adapter changes nothing. All E experts run at once: x [T, d] times [A_1 .. A_E] as one
[d, E*r] matmul, the routing weights gate the E rank-r blocks, and one [E*r, out] matmul sums
them, never a Python loop over experts. The router follows MoLA's code: a bias-free linear map
of the projection's input before dropout, a float32 softmax over all E logits, the top-k kept
and renormalised to sum to 1. With k = 1 that renormalisation makes the weight exactly 1 and the
language-model loss could never train the router, so k = 1 weights the expert by its softmax
probability (Switch Transformer) unless `renormalize_top1`.

Each router sows its statistics (`nnx.Intermediate` "router"): the mean routing probability and
the fraction of top-k assignments per expert, and the mean squared log-partition, from which the
stack computes balance and z losses and usage plots (they are scan outputs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    """Adapter weights (A, B): with RouterParam, the only parameters a fine-tune trains."""


class RouterParam(nnx.Param):
    """A mixture's router weights."""


def routing_weights(logits_TxE: jax.Array, top_k: int, renormalize_top1: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (weights [T, E] with exactly top_k nonzero per token, probs [T, E]), float32."""
    probs = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    kept = jnp.sum(jax.nn.one_hot(chosen, probs.shape[-1], dtype=probs.dtype), axis=-2)
    weights = probs * kept
    if top_k > 1 or renormalize_top1:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, probs


def balance_loss(probs_mean_E: jax.Array, assigned_fraction_E: jax.Array) -> jax.Array:
    """Switch-style load balance E * sum_i f_i P_i: 1 under uniform routing, E under collapse."""
    return probs_mean_E.shape[-1] * jnp.sum(probs_mean_E * assigned_fraction_E, axis=-1)


class Router(nnx.Module):
    """A bias-free linear router over `experts` experts; calling it returns routing weights [T, E]
    and sows its statistics."""

    def __init__(self, d_in: int, experts: int, *, top_k: int, renormalize_top1: bool, rngs: nnx.Rngs,
                 in_axis: str | None = None):
        bound = d_in ** -0.5  # nn.Linear's default init, as MoLA's routers have
        self.weight = RouterParam(jax.random.uniform(rngs.params(), (d_in, experts), jnp.float32, -bound, bound),
                                  axes=(in_axis, None))
        self.top_k, self.renormalize_top1 = top_k, renormalize_top1

    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        logits = x_TxD.astype(jnp.float32) @ self.weight[...].astype(jnp.float32)
        weights, probs = routing_weights(logits, self.top_k, self.renormalize_top1)
        self.sow(nnx.Intermediate, "router", {
            "probs": jnp.mean(probs, axis=0),
            "assigned": jnp.mean((weights > 0).astype(jnp.float32), axis=0) / self.top_k,
            "z": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        })
        return weights


class LowRankAdapter(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, rank: int, alpha: float, rslora: bool, experts: int,
                 top_k: int, renormalize_top1: bool, dropout: float, rngs: nnx.Rngs,
                 axes: tuple[str | None, str | None] = (None, None), router: bool = True):
        """experts: 0 for plain LoRA, else the number of LoRA experts; router=False when a shared
        router outside supplies the weights (MoLE)."""
        self.rank, self.experts, self.dropout = rank, experts, dropout
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        in_axis, out_axis = axes
        bound = d_in ** -0.5  # kaiming-uniform(a=sqrt(5)) over fan_in = d_in, as peft and nn.Linear
        uniform = lambda shape: jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        if experts:
            self.a = LoRAParam(uniform((d_in, experts, rank)), axes=(in_axis, "expert", None))
            self.b = LoRAParam(jnp.zeros((experts, rank, d_out), jnp.float32), axes=("expert", None, out_axis))
            self.router = Router(d_in, experts, top_k=top_k, renormalize_top1=renormalize_top1, rngs=rngs,
                                 in_axis=in_axis) if router else None
        else:
            self.a = LoRAParam(uniform((d_in, rank)), axes=(in_axis, None))
            self.b = LoRAParam(jnp.zeros((rank, d_out), jnp.float32), axes=(None, out_axis))
            self.router = None

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None,
                 weights_TxE: jax.Array | None = None) -> jax.Array:
        """The delta for input x [..., d_in] -> [..., d_out]. dropout_key None: no dropout (eval).
        weights_TxE: routing weights from a shared router (else this adapter routes)."""
        lead, d_in = x.shape[:-1], x.shape[-1]
        x_TxD = x.reshape(-1, d_in)
        if self.experts and weights_TxE is None:
            weights_TxE = self.router(x_TxD)  # reads the input before dropout, as MoLA does
        if dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x_TxD.shape)
            x_TxD = jnp.where(keep, x_TxD / (1.0 - self.dropout), 0).astype(x_TxD.dtype)
        a = self.a[...].astype(x.dtype)
        h = x_TxD @ a.reshape(d_in, -1)  # [T, E*r] (or [T, r]): every expert in one matmul
        if self.experts:
            gated = h.reshape(-1, self.experts, self.rank) * weights_TxE[:, :, None].astype(h.dtype)
            h = gated.reshape(h.shape)
        delta = (h @ self.b[...].astype(x.dtype).reshape(h.shape[-1], -1)) * jnp.asarray(self.scale, x.dtype)
        return delta.reshape(*lead, -1)

    def merged_delta(self) -> jax.Array:
        """s * A B as a [d_in, d_out] matrix, to fold a plain LoRA into its base weight."""
        if self.experts:
            raise ValueError("a mixture of LoRA experts cannot be merged: its weights depend on the input")
        return self.scale * (self.a[...] @ self.b[...])


ROUTER_STATS = ("probs", "assigned", "z")


def pool_router_stats(sown) -> dict[str, jax.Array] | None:
    """A layer's router statistics (an `nnx.Intermediate` state popped from its block), pooled over
    its routers: mean probability and assigned fraction per expert, mean z, and the layer's
    balance loss from the pooled values; None for a layer without routers."""
    found = []

    def walk(node):
        if isinstance(node, dict) and set(node) == set(ROUTER_STATS):
            found.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (tuple, list)):
            for value in node:
                walk(value)

    walk(sown.to_pure_dict())
    if not found:
        return None
    pooled = {k: jnp.mean(jnp.stack([f[k] for f in found]), axis=0) for k in ROUTER_STATS}
    pooled["balance"] = balance_loss(pooled["probs"], pooled["assigned"])
    pooled["entropy"] = -jnp.sum(pooled["probs"] * jnp.log(jnp.maximum(pooled["probs"], 1e-9)), axis=-1)
    return pooled
