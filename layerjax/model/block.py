"""The one block builder: a transformer layer whose structure is read from its `LayerSpec`.

Every norm placement is a branch visible in `__call__`, never a subclass. Per-layer scalars
(`norm_scale` for LayerNorm scaling, `residual_scale` for DeepNorm, the attention `window`)
arrive as scanned inputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.config import ModelConfig, biased_projections, d_ff, head_dim, kv_heads, rope_dims
from layerjax.layers.adapters import LowRankAdapter, Router
from layerjax.layers.attention import Attention, Context, KVCache
from layerjax.layers.attention_kernels import resolve_attention_impl
from layerjax.layers.matmul_cpu import resolve_matmul_impl
from layerjax.layers.canon import canon_widths, make_canon
from layerjax.layers.embed import rope_frequencies
from layerjax.layers.mlp import GATED_ACTIVATIONS, MLP
from layerjax.layers.norms import Norm
from layerjax.model.plan import LayerSpec


class Block(nnx.Module):
    def __init__(self, m: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
        self.spec = spec
        self.windowed = m.sliding_window > 0  # else no layer has a window: skip its mask entirely
        widths = canon_widths(m)
        canon = lambda position, axis: make_canon(m, widths[position], axis, rngs) if position in spec.canon else None
        norm = lambda: (Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias, offset=m.norm_offset)
                        if spec.norm != "none" else None)
        # "pre", "post" and "peri" use these on the sublayer's input side, "reordered" on its output.
        self.attn_norm = norm()
        self.canon_a = canon("A", "embed")
        rope = m.positions == "rope"
        self.attn = Attention(
            m.d_model, m.num_heads, kv_heads(m), head_dim(m),
            rope_freqs=rope_frequencies(rope_dims(m), m.rope_theta, m.rope_scaling, m.rope_factor,
                                        m.rope_low_freq_factor, m.rope_high_freq_factor,
                                        m.rope_original_max_len) if rope else None,
            qk_norm=m.qk_norm, qk_norm_scope=m.qk_norm_scope, norm_type=m.norm_type, norm_eps=m.norm_eps,
            norm_offset=m.norm_offset, biases=biased_projections(m), scale=m.attn_scale, logit_cap=m.attn_softcap,
            init_std=m.init_std, rngs=rngs, canon_b=canon("B", None), value_init_scale=spec.init_scale,
            adapters=make_attention_adapters(m, spec, rngs), impl=resolve_attention_impl(m),
            chunk=m.attention_chunk, block=m.attention_block, matmul=resolve_matmul_impl(m))
        self.mlp_norm = norm()
        self.canon_c = canon("C", "embed")
        mlp_adapters, router = make_mlp_adapters(m, spec, rngs)
        self.mlp = MLP(m.d_model, d_ff(m), m.mlp, biased_projections(m), m.init_std * spec.init_scale, rngs,
                       canon_d=canon("D", "mlp"), adapters=mlp_adapters, router=router, matmul=resolve_matmul_impl(m))
        # Peri-LN's second norm on each sublayer's output, with its own trainable gain.
        self.attn_out_norm = norm() if spec.norm == "peri" else None
        self.mlp_out_norm = norm() if spec.norm == "peri" else None

    def __call__(self, x_BxLxD: jax.Array, scalars: dict[str, jax.Array], ctx: Context,
                 cache: KVCache | None = None, relax: "Relaxation | None" = None) -> tuple[jax.Array, KVCache | None]:
        """cache (decoding only): this layer's dict of "k", "v" and canon states "canon_A".."D".
        relax: this depth's relaxation LoRA when the block is shared (see `Relaxation`)."""
        state = (lambda key: cache[key]) if cache is not None else (lambda key: None)
        new_cache = {} if cache is not None else None
        segments = ctx.segment_ids_BxL
        if ctx.dropout_key is not None:  # each layer draws its own adapter dropout masks
            ctx = dataclasses.replace(ctx, dropout_key=jax.random.fold_in(
                ctx.dropout_key, scalars["layer_index"].astype(jnp.int32)))

        def attention(h):
            if self.canon_a is not None:
                h, canon_state = self.canon_a(h, segments, state("canon_A"))
                if cache is not None:
                    new_cache["canon_A"] = canon_state
            out, attn_cache = self.attn(h, ctx, cache, window=scalars["window"] if self.windowed else None,
                                        relax=None if relax is None else relax.attn)
            if cache is not None:
                new_cache.update(attn_cache)
            return out

        def mlp(h):
            if self.canon_c is not None:
                h, canon_state = self.canon_c(h, segments, state("canon_C"))
                if cache is not None:
                    new_cache["canon_C"] = canon_state
            out, canon_state = self.mlp(h, segments, state("canon_D") if self.mlp.canon_d is not None else None,
                                        ctx.dropout_key, relax=None if relax is None else relax.mlp)
            if cache is not None and self.mlp.canon_d is not None:
                new_cache["canon_D"] = canon_state
            return out

        x = x_BxLxD
        placement = self.spec.norm
        if placement == "pre":  # x + F(s * N(x)); s = 1, or 1/sqrt(l) under LayerNorm scaling
            s = scalars["norm_scale"].astype(x.dtype)
            x = x + attention(s * self.attn_norm(x))
            x = x + mlp(s * self.mlp_norm(x))
        elif placement == "post":  # N(a * x + F(x)); a = 1, or DeepNorm's alpha
            a = scalars["residual_scale"].astype(x.dtype)
            x = self.attn_norm(a * x + attention(x))
            x = self.mlp_norm(a * x + mlp(x))
        elif placement == "peri":  # x + N_out(F(N_in(x)))
            x = x + self.attn_out_norm(attention(self.attn_norm(x)))
            x = x + self.mlp_out_norm(mlp(self.mlp_norm(x)))
        elif placement == "reordered":  # x + N(F(x)) (OLMo-2)
            x = x + self.attn_norm(attention(x))
            x = x + self.mlp_norm(mlp(x))
        elif placement == "none":  # x + F(x)
            x = x + attention(x)
            x = x + mlp(x)
        else:
            raise ValueError(f"unknown norm placement {placement!r}")
        return x, new_cache


class Relaxation(nnx.Module):
    """One depth's relaxation of a shared block (Relaxed Recursive Transformers): a plain LoRA
    W_shared x + B_l A_l x with scale 1 on each targeted projection, so that full rank can
    reproduce an untied layer exactly. A zero B (the init) leaves the shared block unchanged."""

    def __init__(self, m: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
        shapes = projection_axes(m)
        lora = lambda name, rank: LowRankAdapter(shapes[name][0], shapes[name][1], rank=rank, alpha=float(rank),
                                                 rslora=False, experts=0, top_k=0, renormalize_top1=False,
                                                 dropout=0.0, rngs=rngs, axes=shapes[name][2])
        targets = [t for t in m.recursion.lora_targets if t in shapes]
        self.attn = nnx.Dict({t: lora(t, spec.relax_rank) for t in targets
                              if t in ("q", "k", "v", "o") and spec.relax_rank})
        self.mlp = nnx.Dict({t: lora(t, spec.relax_rank_mlp) for t in targets
                             if t in ("gate", "up", "down") and spec.relax_rank_mlp})


def projection_axes(m: ModelConfig) -> dict[str, tuple[int, int, tuple[str, str]]]:
    """(in width, out width, logical axes) of each adaptable projection of a layer."""
    q_width, kv_width = m.num_heads * head_dim(m), kv_heads(m) * head_dim(m)
    shapes = {"q": (m.d_model, q_width, ("embed", "heads")), "k": (m.d_model, kv_width, ("embed", "kv_heads")),
              "v": (m.d_model, kv_width, ("embed", "kv_heads")), "o": (q_width, m.d_model, ("heads", "embed")),
              "up": (m.d_model, d_ff(m), ("embed", "mlp")), "down": (d_ff(m), m.d_model, ("mlp", "embed"))}
    if m.mlp in GATED_ACTIVATIONS:  # "gate" exists only in gated MLPs
        shapes["gate"] = (m.d_model, d_ff(m), ("embed", "mlp"))
    return shapes


def _adapter(m: ModelConfig, spec: LayerSpec, d_in: int, d_out: int, axes, rngs: nnx.Rngs,
             own_router: bool = True) -> LowRankAdapter:
    a = m.adapter
    return LowRankAdapter(d_in, d_out, rank=a.rank, alpha=a.alpha, rslora=a.rslora, experts=spec.experts,
                          top_k=a.top_k, renormalize_top1=a.renormalize_top1, dropout=a.dropout, rngs=rngs,
                          axes=axes, router=own_router)


def make_attention_adapters(m: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs) -> dict[str, LowRankAdapter]:
    """The adapters of the targeted attention projections (in, out widths as the projection's)."""
    if m.adapter.kind == "none":
        return {}
    return {name: _adapter(m, spec, d_in, d_out, axes, rngs) for name, (d_in, d_out, axes) in projection_axes(m).items()
            if name in ("q", "k", "v", "o") and name in m.adapter.targets}


def make_mlp_adapters(m: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs) -> tuple[dict[str, LowRankAdapter], Router | None]:
    """The MLP's adapters, and MoLE's router shared by them (MoLA gives each its own)."""
    if m.adapter.kind == "none":
        return {}, None
    shared = m.adapter.kind == "mole"
    router = Router(m.d_model, spec.experts, top_k=m.adapter.top_k, renormalize_top1=m.adapter.renormalize_top1,
                    rngs=rngs, in_axis="embed") if shared else None
    return {name: _adapter(m, spec, d_in, d_out, axes, rngs, own_router=not shared)
            for name, (d_in, d_out, axes) in projection_axes(m).items()
            if name in ("gate", "up", "down") and name in m.adapter.targets}, router
