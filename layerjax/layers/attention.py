"""Causal multi-head / grouped-query attention with RoPE, optional QK-norm, sliding windows,
logit soft-capping and a KV cache.

Inside attention, heads come before length ([B, H, L, K]) so the score and value matmuls are plain
batched matmuls; the projections are 2-D matmuls over flattened tokens (see `dense`).

The cache is functional: a dict {"k", "v"} of [B, KVH, S, K] arrays passed in and returned, so a
scanned segment carries one stacked cache per layer as an ordinary scan input/output.

The scores, softmax and values are computed by one of the kernels in `attention_kernels`
(model.attention_impl); this module prepares q, k, v and says which keys each query sees.
"""

import dataclasses
from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from layerjax.layers.attention_kernels import TokenCoords, attend, visible
from layerjax.layers.canon import Canon
from layerjax.layers.embed import apply_rope
from layerjax.layers.norms import Norm
from layerjax.layers.params import const_param, dense, normal_param

KVCache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Context:
    """What every layer needs to know about the tokens, computed once per forward pass.

    positions_BxL: position of each token within its document (RoPE and the cache mask).
    segment_ids_BxL: document id per token in a packed row; None means one document per row.
    cache_index: during decoding, the cache slot where these tokens are written; None otherwise.
    """

    positions_BxL: jax.Array
    segment_ids_BxL: jax.Array | None = None
    cache_index: jax.Array | None = None
    dropout_key: jax.Array | None = None  # adapter dropout (training only); None: no dropout


def token_coords(ctx: Context, num_keys: int) -> tuple[TokenCoords, TokenCoords]:
    """(queries, keys) for `visible`: in a forward over whole rows both are the row's own tokens in
    order; when decoding, keys are cache slots 0..S-1 (filled up to the query) and a query's slot is
    its position."""
    if ctx.cache_index is not None:
        slots_1xS = jnp.arange(num_keys)[None]
        return TokenCoords(ctx.positions_BxL, ctx.positions_BxL), TokenCoords(slots_1xS, slots_1xS)
    tokens = TokenCoords(jnp.arange(ctx.positions_BxL.shape[1])[None], ctx.positions_BxL, ctx.segment_ids_BxL)
    return tokens, tokens


def attention_mask(ctx: Context, num_keys: int, window: jax.Array | None = None) -> jax.Array:
    """[B, L, S] boolean: which keys each query may attend to (see `visible` for the window)."""
    return visible(*token_coords(ctx, num_keys), window)


class Attention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_freqs, qk_norm: bool, norm_type: str, norm_eps: float, init_std: float,
                 rngs: nnx.Rngs, biases: Collection[str] = (), qk_norm_scope: str = "head",
                 norm_offset: bool = False, scale: float = 0.0, logit_cap: float = 0.0,
                 canon_b: Canon | None = None, value_init_scale: float = 1.0, adapters: dict | None = None,
                 impl: str = "xla", chunk: int = 512, block: int = 128, matmul: str = "xla"):
        """rope_freqs: RoPE's inverse frequencies (`rope_frequencies`), None for no RoPE.
        biases: which of "q", "k", "v", "o" have a bias. scale, logit_cap: see
        `reference_attention`. value_init_scale multiplies the init std of wv and wo only
        (DeepNorm's beta). impl, chunk, block: the attention kernel and the chunked and
        causal_blocks kernels' block sizes (`attention_kernels.attend`; "auto" resolved by
        `resolve_attention_impl`). matmul: the projections' matmuls (`dense`'s impl)."""
        # A tuple of floats, not an array: static module data must be hashable.
        self.rope_freqs = None if rope_freqs is None else tuple(float(f) for f in rope_freqs)
        # Low-rank adapters by projection name ("q", "k", "v", "o"), each adding a delta to its output.
        self.adapters = nnx.Dict(adapters or {})
        self.scale, self.logit_cap = scale, logit_cap
        self.impl, self.chunk, self.block, self.matmul = impl, chunk, block, matmul
        self.canon_b = canon_b  # canon position B: on q, k, v after QK-norm, before RoPE
        self.wq = normal_param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", "head_dim"), init_std)
        self.wk = normal_param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), init_std)
        self.wv = normal_param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                               init_std * value_init_scale)
        self.wo = normal_param(rngs, (num_heads, head_dim, d_model), ("heads", "head_dim", "embed"),
                               init_std * value_init_scale)
        bias = lambda name, shape, axes: const_param(shape, axes, 0.0) if name in biases else None
        self.bq = bias("q", (num_heads, head_dim), ("heads", "head_dim"))
        self.bk = bias("k", (num_kv_heads, head_dim), ("kv_heads", "head_dim"))
        self.bv = bias("v", (num_kv_heads, head_dim), ("kv_heads", "head_dim"))
        self.bo = bias("o", (d_model,), ("embed",))
        if qk_norm and qk_norm_scope == "head":  # each head's query and key vector over head_dim
            self.q_norm = Norm(head_dim, norm_type, norm_eps, axis_name="head_dim", offset=norm_offset)
            self.k_norm = Norm(head_dim, norm_type, norm_eps, axis_name="head_dim", offset=norm_offset)
        elif qk_norm:  # "full": all of a token's queries (keys) at once, gains sharded like q (k)
            self.q_norm = Norm((num_heads, head_dim), norm_type, norm_eps, axis_name=("heads", "head_dim"),
                               offset=norm_offset)
            self.k_norm = Norm((num_kv_heads, head_dim), norm_type, norm_eps, axis_name=("kv_heads", "head_dim"),
                               offset=norm_offset)
        self.qk_norm = qk_norm

    def __call__(self, x_BxLxD: jax.Array, ctx: Context, cache: KVCache | None = None,
                 window: jax.Array | None = None, relax: dict | None = None) -> tuple[jax.Array, KVCache | None]:
        """window: this layer's sliding-window length (see `attention_mask`), None for none.
        relax: a shared block's per-depth relaxation LoRA by projection name (added like adapters)."""
        dtype = x_BxLxD.dtype
        # One [D, H+2N, K] matmul instead of three: larger matmuls run closer to peak on CPU.
        heads, kv_heads = self.wq.shape[1], self.wk.shape[1]
        w_qkv = jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1)
        q, k, v = jnp.split(dense(x_BxLxD, w_qkv, impl=self.matmul), [heads, heads + kv_heads], axis=2)  # [B, L, *, K]
        add_bias = lambda t, b: t if b is None else t + b[...].astype(dtype)
        q, k, v = add_bias(q, self.bq), add_bias(k, self.bk), add_bias(v, self.bv)
        q, k, v = (self._adapted(name, x_BxLxD, t, ctx, relax) for name, t in (("q", q), ("k", k), ("v", v)))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        new_cache = None if cache is None else {}
        if self.canon_b is not None:
            batch, length = x_BxLxD.shape[:2]
            qkv_BxLxC = jnp.concatenate([q, k, v], axis=2).reshape(batch, length, -1)
            qkv_BxLxC, canon_state = self.canon_b(qkv_BxLxC, ctx.segment_ids_BxL, None if cache is None else cache["canon_B"])
            q, k, v = jnp.split(qkv_BxLxC.reshape(batch, length, -1, q.shape[-1]), [heads, heads + kv_heads], axis=2)
            if cache is not None:
                new_cache["canon_B"] = canon_state
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # -> [B, heads, L, K]
        if self.rope_freqs is not None:
            q = apply_rope(q, ctx.positions_BxL, self.rope_freqs)
            k = apply_rope(k, ctx.positions_BxL, self.rope_freqs)
        if cache is not None:
            at = (0, 0, ctx.cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
            new_cache.update(k=k, v=v)
        # A one-token decoding step has one row of scores per head ([1, S]): nothing for another
        # kernel to save, so every impl takes the reference there. A prefill (several tokens) keeps it.
        impl = "xla" if cache is not None and q.shape[2] == 1 else self.impl
        out_BxHxLxK = attend(impl, q, k.astype(dtype), v.astype(dtype), *token_coords(ctx, k.shape[2]), window,
                             self_attention=cache is None, scale=self.scale, logit_cap=self.logit_cap,
                             chunk=self.chunk, block=self.block)
        out_BxLxHxK = jnp.swapaxes(out_BxHxLxK, 1, 2)
        out_BxLxD = add_bias(dense(out_BxLxHxK, self.wo[...], in_dims=2, impl=self.matmul), self.bo)
        out_BxLxD = self._adapted("o", out_BxLxHxK.reshape(*out_BxLxD.shape[:2], -1), out_BxLxD, ctx, relax)
        return out_BxLxD, new_cache

    def _adapted(self, name: str, adapter_in: jax.Array, projected: jax.Array, ctx: Context,
                 relax: dict | None = None) -> jax.Array:
        """projected + the named adapter's and relaxation's deltas of adapter_in (where they exist)."""
        if relax and name in relax:
            projected = projected + relax[name](adapter_in).reshape(projected.shape)
        if name not in self.adapters:
            return projected
        key = None if ctx.dropout_key is None else jax.random.fold_in(ctx.dropout_key, "qkvo".index(name))
        return projected + self.adapters[name](adapter_in, key).reshape(projected.shape)
