"""The one block builder: a transformer layer whose structure is read from its `LayerSpec`.

Every variant is a branch visible in `__call__`, never a subclass.
"""

import jax
from flax import nnx

from layerjax.config import ModelConfig, d_ff, head_dim, kv_heads
from layerjax.layers.attention import Attention, Context, KVCache
from layerjax.layers.canon import canon_widths, make_canon
from layerjax.layers.mlp import MLP
from layerjax.layers.norms import Norm
from layerjax.model.plan import LayerSpec


class Block(nnx.Module):
    def __init__(self, m: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
        self.spec = spec
        widths = canon_widths(m)
        canon = lambda position, axis: make_canon(m, widths[position], axis, rngs) if position in spec.canon else None
        self.attn_norm = Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias)
        self.canon_a = canon("A", "embed")
        self.attn = Attention(
            m.d_model, m.num_heads, kv_heads(m), head_dim(m),
            rope_theta=m.rope_theta if m.positions == "rope" else None, qk_norm=m.qk_norm,
            norm_type=m.norm_type, norm_eps=m.norm_eps, use_bias=m.use_bias, init_std=m.init_std, rngs=rngs,
            canon_b=canon("B", None))
        self.mlp_norm = Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias)
        self.canon_c = canon("C", "embed")
        self.mlp = MLP(m.d_model, d_ff(m), m.mlp, m.use_bias, m.init_std, rngs, canon_d=canon("D", "mlp"))

    def __call__(self, x_BxLxD: jax.Array, scalars: dict[str, jax.Array], ctx: Context,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """cache (decoding only): this layer's dict of "k", "v" and canon states "canon_A".."D"."""
        state = (lambda key: cache[key]) if cache is not None else (lambda key: None)
        new_cache = {} if cache is not None else None
        segments = ctx.segment_ids_BxL

        def attention(h):
            if self.canon_a is not None:
                h, canon_state = self.canon_a(h, segments, state("canon_A"))
                if cache is not None:
                    new_cache["canon_A"] = canon_state
            out, attn_cache = self.attn(h, ctx, cache)
            if cache is not None:
                new_cache.update(attn_cache)
            return out

        def mlp(h):
            if self.canon_c is not None:
                h, canon_state = self.canon_c(h, segments, state("canon_C"))
                if cache is not None:
                    new_cache["canon_C"] = canon_state
            out, canon_state = self.mlp(h, segments, state("canon_D") if self.mlp.canon_d is not None else None)
            if cache is not None and self.mlp.canon_d is not None:
                new_cache["canon_D"] = canon_state
            return out

        x = x_BxLxD
        if self.spec.norm == "pre":
            x = x + attention(self.attn_norm(x))
            x = x + mlp(self.mlp_norm(x))
        elif self.spec.norm == "post":
            x = self.attn_norm(x + attention(x))
            x = self.mlp_norm(x + mlp(x))
        else:
            raise ValueError(f"unknown norm placement {self.spec.norm!r}")
        return x, new_cache
