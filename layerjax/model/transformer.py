"""The decoder: embed -> one scanned stack per plan segment -> final norm -> head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.config import ModelConfig, head_dim, kv_heads, recursion_exits
from layerjax.layers.canon import canon_widths
from layerjax.diagnostics.stats import residual_stats
from layerjax.layers.adapters import pool_router_stats
from layerjax.layers.attention import Context, KVCache
from layerjax.layers import attention_cpu, matmul_cpu
from layerjax.layers.attention_kernels import resolve_attention_impl, softcap
from layerjax.layers.matmul_cpu import resolve_matmul_impl
from layerjax.layers.embed import Embedding, LearnedPositions
from layerjax.layers.norms import Norm
from layerjax.layers.params import dense, normal_param
from layerjax.model.block import Block, Relaxation
from layerjax.model.plan import Plan, Segment, build_plan
from layerjax.sharding import constrain

# The residual stream's logical axes, pinned at every block boundary when a step is traced with
# activation sharding on (layerjax.sharding.activation_sharding); a no-op otherwise.
RESIDUAL_AXES = ("batch", "length", "act_embed")

# The CPU attention kernel's output and softmax statistics, and the MKL matmuls' outputs (custom
# calls, not dots, so the dot policies would drop them): kept, or the backward pass would rerun
# the kernels' forward.
_keep_cpu_kernels = jax.checkpoint_policies.save_only_these_names(*attention_cpu.SAVED_NAMES,
                                                                   matmul_cpu.SAVED_NAME)
REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it all in the backward pass
    # keep the outputs of weight matmuls, recompute attention scores and elementwise ops
    "save_matmuls": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _keep_cpu_kernels),
    # keep every matmul's output, attention's scores and weighted values too: the backward pass
    # recomputes only elementwise work (the softmax's exp among it). Scores cost [heads, keys] per
    # token and layer; the chunked kernel's own checkpoints still keep none.
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, _keep_cpu_kernels),
}


def resolve_remat(m: ModelConfig) -> str:
    """model.remat as a policy name. "auto": on CPU save_dots, which recomputes the elementwise
    work instead of storing it, and was faster there than keeping everything (bench_cpu ~+15%:
    storing costs more memory traffic and page faults than recomputing) and than recomputing
    attention's matmuls too (save_matmuls, ~5%); but save_matmuls with the chunked kernel,
    whose score blocks save_dots would keep, and memory would grow quadratically again; and none
    where the layers run unrolled on CPU (see `layers_unrolled`): XLA:CPU merges any
    recomputation back into the forward there, and the checkpoint would only add its no-op
    reduce-precision ops (6 ms of bench_cpu's step); elsewhere none."""
    if m.remat != "auto":
        return m.remat
    platform = jax.devices()[0].platform
    if platform != "cpu" or layers_unrolled(m, platform):
        return "none"
    return "save_matmuls" if resolve_attention_impl(m) == "chunked" else "save_dots"


def layers_unrolled(m: ModelConfig, platform: str | None = None) -> bool:
    """Whether the layers run as straight-line code, with no loop: scan_layers=false, or a scan
    body that holds the whole stack (model.scan_unroll, resolved for `platform`)."""
    unroll = resolve_unroll(m, platform)
    return not m.scan_layers or unroll == 0 or unroll >= m.num_layers


# model.scan_unroll="auto" runs stacks of up to this many layers unrolled on CPU.
AUTO_UNROLL_MAX_LAYERS = 12


def resolve_unroll(m: ModelConfig, platform: str | None = None) -> int:
    """model.scan_unroll as layers per scan iteration (0: the whole segment). "auto": 0 on CPU
    for a model of at most AUTO_UNROLL_MAX_LAYERS layers, where XLA:CPU's loop costs the step
    ~10% in zero-filled, copied-in and copied-out stacks of saved activations; elsewhere, and for
    deeper models (whose compile time would grow with depth), 1. platform: the backend's
    (default: this process's first device's)."""
    if m.scan_unroll != "auto":
        return m.scan_unroll
    cpu = (platform or jax.devices()[0].platform) == "cpu"
    return 0 if cpu and m.num_layers <= AUTO_UNROLL_MAX_LAYERS else 1


class LayerStack(nnx.Module):
    """The layers of one segment: parameters stacked on a leading `layers` axis, run by one scan.

    A shared segment (`Segment.blocks`) stacks its K unique blocks instead, and each scan step
    takes the block its depth runs by index; its per-depth relaxation LoRA (`relax`, stacked
    over depths) is a scanned input like the scalars and the cache."""

    def __init__(self, m: ModelConfig, segment: Segment, rngs: nnx.Rngs):
        self.num_layers = segment.num_layers
        self.block_index = None if segment.blocks is None else tuple(segment.blocks)

        @nnx.split_rngs(splits=segment.num_blocks)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(m, segment.spec, rngs)

        @nnx.split_rngs(splits=segment.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make_relaxations(rngs: nnx.Rngs) -> Relaxation:
            return Relaxation(m, segment.spec, rngs)

        self.blocks = make_blocks(rngs)
        relaxed = segment.spec.relax_rank or segment.spec.relax_rank_mlp
        self.relax = make_relaxations(rngs) if relaxed else None
        for stacked in (self.blocks, self.relax):
            for _, variable in nnx.iter_graph(stacked) if stacked is not None else ():
                if isinstance(variable, nnx.Param):  # vmap added the leading axis; name it
                    variable.set_metadata(axes=("layers", *variable.get_metadata()["axes"]))

    def __call__(self, x_BxLxD: jax.Array, scalars: dict[str, jax.Array], ctx: Context,
                 cache: KVCache | None, *, scan: bool, remat: str, unroll: int = 1, probe: str | None = None,
                 skip_layer: jax.Array | None = None, depths: int | None = None):
        """Returns (x, cache, probes): probes is None, or per layer (stacked on a leading axis) the
        `residual_stats` dict (probe="stats") or the layer's output (probe="hidden").
        skip_layer: a global layer index whose layer becomes the identity (layer removal).
        depths: run only the segment's first `depths` layers (an early exit inside it); the
        cache entries of the others come back unchanged."""
        graphdef, params = nnx.split(self.blocks)
        relax_graph, relax_params = nnx.split(self.relax) if self.relax is not None else (None, None)
        shared = self.block_index is not None
        num_layers = self.num_layers if depths is None else depths
        full_cache = cache
        if depths is not None:
            head = lambda tree: jax.tree.map(lambda a: a[:depths], tree)
            scalars, cache, relax_params = head(scalars), head(cache), head(relax_params)
            params = params if shared else head(params)

        def layer(x, per_layer):
            layer_params, layer_scalars, layer_cache, block_index, layer_relax = per_layer
            if shared:  # this depth's unique block, taken by a traced index: one body for all loops
                layer_params = jax.tree.map(lambda p: jnp.take(p, block_index, axis=0), layer_params)
            block = nnx.merge(graphdef, layer_params)
            relax = None if layer_relax is None else nnx.merge(relax_graph, layer_relax)
            y, layer_cache = block(x, layer_scalars, ctx, layer_cache, relax=relax)
            # Router statistics of LoRA-expert layers are scan outputs, like the probes.
            router = pool_router_stats(nnx.pop(block, nnx.Intermediate))
            y = constrain(y, RESIDUAL_AXES)
            if skip_layer is not None:
                y = jnp.where(layer_scalars["layer_index"] == skip_layer, x, y)
            if probe == "stats":
                return y, (layer_cache, residual_stats(x, y), router)
            return y, (layer_cache, y if probe in ("hidden", "exits") else None, router)

        if remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
        index = None if not shared else jnp.asarray(self.block_index[:num_layers], jnp.int32)
        if scan:
            # Shared blocks are closed over (their gradient sums over the depths that use them);
            # own parameters are scanned.
            body = (lambda x, xs: layer(x, (params, *xs))) if shared else layer
            per_layer = (scalars, cache, index, relax_params) if shared else (params, scalars, cache, None, relax_params)
            # unroll=0: the whole segment in one body (lax.scan's unroll=True).
            x, (cache, probes, router) = jax.lax.scan(body, x_BxLxD, per_layer, unroll=unroll or True)
        else:  # unrolled, for debugging: the same stacked parameters, sliced one layer at a time
            x, outputs = x_BxLxD, []
            for i in range(num_layers):
                own = params if shared else jax.tree.map(lambda a: a[i], params)
                per_depth = jax.tree.map(lambda a: a[i], (scalars, cache, index, relax_params))
                x, out = layer(x, (own, *per_depth))
                outputs.append(out)
            cache, probes, router = jax.tree.map(lambda *c: jnp.stack(c), *outputs)
        if router is not None:
            self.sow(nnx.Intermediate, "router", router)  # read back with `router_stats`
        if depths is not None and full_cache is not None:  # the layers not run keep their entries
            cache = jax.tree.map(lambda new, old: jnp.concatenate([new, old[depths:]]), cache, full_cache)
        return x, cache, probes


class Transformer(nnx.Module):
    def __init__(self, m: ModelConfig, rngs: nnx.Rngs, plan: Plan | None = None):
        self.config = m
        self.plan = plan or build_plan(m)
        self.matmul = resolve_matmul_impl(m)  # the head's matmul (`dense`'s impl)
        self.embed = Embedding(m.vocab_size, m.d_model, m.init_std, rngs, scaled=m.embed_scale)
        self.positions = LearnedPositions(m.max_seq_len, m.d_model, m.init_std, rngs) if m.positions == "learned" else None
        norm = lambda: Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias, offset=m.norm_offset)
        self.embed_norm = norm() if m.embed_norm else None
        self.stacks = nnx.List([LayerStack(m, seg, rngs) for seg in self.plan.segments])
        self.final_norm = norm() if m.final_norm else None
        self.head = None if m.tie_embeddings else normal_param(rngs, (m.d_model, m.vocab_size), ("embed", "vocab"), m.init_std)

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                 segment_ids_BxL: jax.Array | None = None, cache: list[KVCache] | None = None,
                 cache_index: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 exit_depth: int | None = None) -> tuple[jax.Array, list[KVCache] | None]:
        """Returns float32 logits [B, L, V] and, when a cache is given, the updated cache.
        exit_depth: run only the first that many layers and read them out through the head."""
        logits, cache, _ = self.forward(tokens_BxL, positions_BxL, segment_ids_BxL, cache, cache_index,
                                        dropout_key=dropout_key, exit_depth=exit_depth)
        return logits, cache

    def forward(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
                segment_ids_BxL: jax.Array | None = None, cache: list[KVCache] | None = None,
                cache_index: jax.Array | None = None, *, probe: str | None = None,
                skip_layer: jax.Array | None = None, dropout_key: jax.Array | None = None,
                exit_depth: int | None = None, apply_head: bool = True):
        """`__call__` plus per-layer probes: returns (logits, cache, probes) where probes is None,
        for probe="stats" a dict of [num_layers] arrays (see `residual_stats`), or for
        probe="hidden" the residual stream [num_layers + 1, B, L, D] entering each layer and
        leaving the last, for probe="exits" the residual stream after each early-exit depth
        (model.recursion.exits) [exits, B, L, D], to be read out by `head_logits`.
        skip_layer: that layer (a traced index) acts as the identity.
        dropout_key: adapter dropout (training); None: none. Models with LoRA experts sow their
        per-layer router statistics, read back with `router_stats(model)`. exit_depth (static):
        stop after that many layers (an early exit; 1..num_layers), with probe None.
        apply_head=False: the first output is the residual stream leaving the last layer [B, L, D]
        instead of the logits, for a loss that runs `head_logits` itself (blockwise)."""
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
        stack_probe = "hidden" if probe == "exits" else probe
        if exit_depth is not None and not (1 <= exit_depth <= m.num_layers and probe is None):
            raise ValueError(f"exit_depth={exit_depth} must be in 1..{m.num_layers} (and without probes)")
        for stack, segment in zip(self.stacks, self.plan.segments):
            scalars = {k: jnp.asarray(v) for k, v in self.plan.segment_scalars(segment).items()}
            stack_cache = None if cache is None else cache[len(new_cache)]
            depths = None if exit_depth is None or exit_depth >= segment.first_layer + segment.num_layers \
                else exit_depth - segment.first_layer
            if depths is not None and depths <= 0:  # past the exit: this segment does not run
                if cache is not None:
                    new_cache.append(stack_cache)
                continue
            x, stack_cache, stack_probes = stack(x, scalars, ctx, stack_cache, scan=m.scan_layers, remat=resolve_remat(m),
                                                 unroll=resolve_unroll(m), probe=stack_probe, skip_layer=skip_layer, depths=depths)
            if cache is not None:
                new_cache.append(stack_cache)
            probes.append(stack_probes)
        logits = self.head_logits(x) if apply_head else x
        probes = jax.tree.map(lambda *p: jnp.concatenate(p), *probes) if probe else None
        if probe == "exits":  # the outputs of layers d-1 for exit depths d (layers run)
            probes = probes[jnp.asarray(recursion_exits(m), jnp.int32) - 1]
        return logits, new_cache, probes

    def head_logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """The output head on a residual stream: final norm, tied or own head, float32, softcap.
        Early exits read the stream after an inner depth through this same head."""
        m = self.config
        if self.final_norm is not None:
            x_BxLxD = self.final_norm(x_BxLxD)
        if self.head is None:
            logits = self.embed.attend(x_BxLxD, self.matmul)
        else:
            logits = dense(x_BxLxD, self.head[...], impl=self.matmul)
        logits = logits.astype(jnp.float32)
        if m.final_softcap:
            logits = softcap(logits, m.final_softcap)
        return logits

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
