"""The one block builder: a transformer layer whose structure is read from its `LayerSpec`.

Every variant is a branch visible in `__call__`, never a subclass.
"""

import jax
from flax import nnx

from layerjax.config import ModelConfig, d_ff, head_dim, kv_heads
from layerjax.layers.attention import Attention, Context, KVCache
from layerjax.layers.mlp import MLP
from layerjax.layers.norms import Norm
from layerjax.model.plan import LayerSpec


class Block(nnx.Module):
    def __init__(self, m: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
        self.spec = spec
        self.attn_norm = Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias)
        self.attn = Attention(
            m.d_model, m.num_heads, kv_heads(m), head_dim(m),
            rope_theta=m.rope_theta if m.positions == "rope" else None, qk_norm=m.qk_norm,
            norm_type=m.norm_type, norm_eps=m.norm_eps, use_bias=m.use_bias, init_std=m.init_std, rngs=rngs)
        self.mlp_norm = Norm(m.d_model, m.norm_type, m.norm_eps, m.use_bias)
        self.mlp = MLP(m.d_model, d_ff(m), m.mlp, m.use_bias, m.init_std, rngs)

    def __call__(self, x_BxLxD: jax.Array, scalars: dict[str, jax.Array], ctx: Context,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        x = x_BxLxD
        if self.spec.norm == "pre":
            attn_out, cache = self.attn(self.attn_norm(x), ctx, cache)
            x = x + attn_out
            x = x + self.mlp(self.mlp_norm(x))
        elif self.spec.norm == "post":
            attn_out, cache = self.attn(x, ctx, cache)
            x = self.attn_norm(x + attn_out)
            x = self.mlp_norm(x + self.mlp(x))
        else:
            raise ValueError(f"unknown norm placement {self.spec.norm!r}")
        return x, cache
