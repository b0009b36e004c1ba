"""The decoder: embed -> one scanned stack per plan segment -> final norm -> head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.config import ModelConfig, head_dim, kv_heads
from layerjax.layers.canon import canon_widths
from layerjax.diagnostics.stats import residual_stats
from layerjax.layers.adapters import pool_router_stats
from layerjax.layers.attention import Context, KVCache, softcap
from layerjax.layers.embed import Embedding, LearnedPositions
from layerjax.layers.norms import Norm
from layerjax.layers.params import dense, normal_param
from layerjax.model.block import Block
from layerjax.model.plan import Plan, Segment, build_plan
from layerjax.sharding import constrain

# The residual stream's logical axes, pinned at every block boundary when a step is traced with
# activation sharding on (layerjax.sharding.activation_sharding); a no-op otherwise.
RESIDUAL_AXES = ("batch", "length", "act_embed")

REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it all in the backward pass
    # keep the outputs of weight matmuls, recompute attention scores and elementwise ops
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    """The layers of one segment: parameters stacked on a leading `layers` axis, run by one scan."""

    def __init__(self, m: ModelConfig, segment: Segment, rngs: nnx.Rngs):
        self.num_layers = segment.num_layers

        @nnx.split_rngs(splits=segment.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(m, segment.spec, rngs)

        self.blocks = make_blocks(rngs)
        for _, variable in nnx.iter_graph(self.blocks):
            if isinstance(variable, nnx.Param):  # vmap added the leading axis; name it
                variable.set_metadata(axes=("layers", *variable.get_metadata()["axes"]))

    def __call__(self, x_BxLxD: jax.Array, scalars: dict[str, jax.Array], ctx: Context,
                 cache: KVCache | None, *, scan: bool, remat: str, probe: str | None = None,
                 skip_layer: jax.Array | None = None):
        """Returns (x, cache, probes): probes is None, or per layer (stacked on a leading axis) the
        `residual_stats` dict (probe="stats") or the layer's output (probe="hidden").
        skip_layer: a global layer index whose layer becomes the identity (layer removal)."""
        graphdef, params = nnx.split(self.blocks)

        def layer(x, per_layer):
            layer_params, layer_scalars, layer_cache = per_layer
            block = nnx.merge(graphdef, layer_params)
            y, layer_cache = block(x, layer_scalars, ctx, layer_cache)
            # Router statistics of LoRA-expert layers are scan outputs, like the probes.
            router = pool_router_stats(nnx.pop(block, nnx.Intermediate))
            y = constrain(y, RESIDUAL_AXES)
            if skip_layer is not None:
                y = jnp.where(layer_scalars["layer_index"] == skip_layer, x, y)
            if probe == "stats":
                return y, (layer_cache, residual_stats(x, y), router)
            return y, (layer_cache, y if probe == "hidden" else None, router)

        if remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
        per_layer = (params, scalars, cache)
        if scan:
            x, (cache, probes, router) = jax.lax.scan(layer, x_BxLxD, per_layer)
        else:  # unrolled, for debugging: the same stacked parameters, sliced one layer at a time
            x, outputs = x_BxLxD, []
            for i in range(self.num_layers):
                x, out = layer(x, jax.tree.map(lambda a: a[i], per_layer))
                outputs.append(out)
            cache, probes, router = jax.tree.map(lambda *c: jnp.stack(c), *outputs)
        if router is not None:
            self.sow(nnx.Intermediate, "router", router)  # read back with `router_stats`
        return x, cache, probes


class Transformer(nnx.Module):
    def __init__(self, m: ModelConfig, rngs: nnx.Rngs, plan: Plan | None = None):
        self.config = m
        self.plan = plan or build_plan(m)
        self.embed = Embedding(m.vocab_size, m.d_model, m.init_std, rngs, scaled=m.embed_scale)
        self.positions = LearnedPositions(m.max_seq_len, m.d_model, m.init_std, rngs) if m.positions == "learned" else None
        norm = lambda: Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias, offset=m.norm_offset)
        self.embed_norm = norm() if m.embed_norm else None
        self.stacks = nnx.List([LayerStack(m, seg, rngs) for seg in self.plan.segments])
        self.final_norm = norm() if m.final_norm else None
        self.head = None if m.tie_embeddings else normal_param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std)

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, cache: list[KVCache] | None = None,
                 cache_index: jax.Array | None = None, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, list[KVCache] | None]:
        """Returns float32 logits [B, L, V] and, when a cache is given, the updated cache."""
        logits, cache, _ = self.forward(tokens_BxL, positions_BxL, segment_ids_BxL, cache, cache_index,
                                        dropout_key=dropout_key)
        return logits, cache

    def forward(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                segment_ids_BxL: jax.Array | None = None, cache: list[KVCache] | None = None,
                cache_index: jax.Array | None = None, *, probe: str | None = None,
                skip_layer: jax.Array | None = None, dropout_key: jax.Array | None = None):
        """`__call__` plus per-layer probes: returns (logits, cache, probes) where probes is None,
        for probe="stats" a dict of [num_layers] arrays (see `residual_stats`), or for
        probe="hidden" the residual stream [num_layers + 1, B, L, D] entering each layer and
        leaving the last. skip_layer: that layer (a traced index) acts as the identity.
        dropout_key: adapter dropout (training); None: none. Models with LoRA experts sow their
        per-layer router statistics, read back with `router_stats(model)`."""
        m = self.config
        dtype = jnp.dtype(m.dtype)
        batch, length = tokens_BxL.shape
        if positions_BxL is None:
            start = 0 if cache_index is None else cache_index
            positions_BxL = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
        if not m.document_mask:
            segment_ids_BxL = None
        ctx = Context(positions_BxL, segment_ids_BxL, cache_index, dropout_key)
        x = self.embed(tokens_BxL, dtype)
        if self.positions is not None:
            x = x + self.positions(positions_BxL, dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = constrain(x, RESIDUAL_AXES)
        new_cache = [] if cache is not None else None
        probes = [x[None]] if probe == "hidden" else []
        for stack, segment in zip(self.stacks, self.plan.segments):
            scalars = {k: jnp.asarray(v) for k, v in self.plan.segment_scalars(segment).items()}
            stack_cache = None if cache is None else cache[len(new_cache)]
            x, stack_cache, stack_probes = stack(x, scalars, ctx, stack_cache, scan=m.scan_layers, remat=m.remat,
                                                 probe=probe, skip_layer=skip_layer)
            if cache is not None:
                new_cache.append(stack_cache)
            probes.append(stack_probes)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.head is None:
            logits = self.embed.attend(x)
        else:
            logits = dense(x, self.head[...])
        logits = logits.astype(jnp.float32)
        if m.final_softcap:
            logits = softcap(logits, m.final_softcap)
        probes = jax.tree.map(lambda *p: jnp.concatenate(p), *probes) if probe else None
        return logits, new_cache, probes

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
        """An empty decoding cache, per segment a dict stacked over its layers: "k" and "v" of
        shape [layers, B, KVH, max_len, K], and each canon position's last K-1 inputs."""
        m = self.config
        caches = []
        for segment in self.plan.segments:
            n = segment.num_layers
            cache = {"k": jnp.zeros((n, batch, kv_heads(m), max_len, head_dim(m)), dtype)}
            cache["v"] = jnp.zeros_like(cache["k"])
            widths = canon_widths(m)
            for position in segment.spec.canon:
                cache[f"canon_{position}"] = jnp.zeros((n, batch, m.canon_kernel - 1, widths[position]), dtype)
            caches.append(cache)
        return caches


def router_stats(model: Transformer) -> list[dict[str, jax.Array]]:
    """Pops the router statistics the last forward pass sowed: per segment with routers, a dict of
    [layers, ...] arrays (probs, assigned, z, balance, entropy). Empty without LoRA experts."""
    sown = nnx.pop(model, nnx.Intermediate)
    stacks = sown.to_pure_dict().get("stacks", {})
    return [value["router"][0] for _, value in sorted(stacks.items()) if "router" in value]
