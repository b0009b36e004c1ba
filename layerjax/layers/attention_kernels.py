"""The attention kernels: softmax(scale * q k^T) v over the keys each query may see.

Every kernel takes queries [B, H, L, K] and keys and values [B, N, S, K] (N kv heads, each shared
by a group of G = H / N query heads) and returns [B, H, L, K]. Which keys a query sees is one rule,
`visible`, over `TokenCoords`; the kernels differ only in how they compute the same thing
(model.attention_impl):

- "xla", `reference_attention`: the whole [L, S] score matrix per head, hand-written. The reference
  the others are tested against; it, "causal_blocks" and "chunked" have a logit softcap.
- "jax_nn" / "cudnn", `library_attention`: `jax.nn.dot_product_attention` with its XLA or cuDNN
  (flash attention) implementation. It has no logit softcap.
- "causal_blocks", `causal_block_attention`: the reference, one block of queries at a time against
  only the keys up to the block's end, so most of the score matrix above the causal diagonal is
  never computed; the default off cuDNN (about half the time of "xla" on CPU).
- "chunked", `chunked_attention`: blockwise over query and key chunks with an online softmax, so
  memory grows linearly with the sequence length instead of quadratically.
- "cpu_kernel", `attention_cpu.cpu_attention`: C++ forward and backward through XLA's FFI, on one
  CPU device in float32 (else causal_blocks); keeps only the output and the softmax statistics.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from layerjax.config import ConfigError, ModelConfig, head_dim as model_head_dim
from layerjax.layers import attention_cpu

# What a masked logit becomes: finite, so a query row that sees no key in a block stays NaN-free.
MASKED = float(jnp.finfo(jnp.float32).min)


class TokenCoords(NamedTuple):
    """Where tokens sit, for deciding which keys a query sees: [B or 1, n] int arrays."""

    order: jax.Array  # a query sees keys of order <= its own: the row index, or the cache slot when decoding
    position: jax.Array  # within-document position, what the sliding window counts in
    segment: jax.Array | None = None  # document id in a packed row; None: one document


def visible(queries: TokenCoords, keys: TokenCoords, window: jax.Array | None = None) -> jax.Array:
    """[B, Lq, Sk] boolean: causal order, the same document, and within the window.

    window (a per-layer scalar, traced under scan): a query at position i sees keys at positions
    j with i - window < j <= i, itself included (Hugging Face's convention); None: no window."""
    mask = keys.order[:, None, :] <= queries.order[:, :, None]
    if queries.segment is not None:
        mask = mask & (queries.segment[:, :, None] == keys.segment[:, None, :])
    if window is not None:
        mask = mask & (keys.position[:, None, :] > queries.position[:, :, None] - jnp.asarray(window, jnp.int32))
    return mask


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): bounds logits to (-cap, cap) smoothly (Gemma-2)."""
    return cap * jnp.tanh(x / cap)


def reference_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, mask_BxLxS, scale: float = 0.0,
                        logit_cap: float = 0.0) -> jax.Array:
    """softmax(scale * q k^T) v with the whole score matrix at once. scale 0: 1/sqrt(K).
    logit_cap > 0: scaled logits are soft-capped before the mask."""
    batch, heads, length, head_dim = q_BxHxLxK.shape
    kv_heads = k_BxNxSxK.shape[1]
    group = heads // kv_heads
    scale = scale or head_dim**-0.5
    # A group's queries are stacked along length, so each kv head serves one [G*L, S] matmul.
    q_BxNxGLxK = (q_BxHxLxK * scale).reshape(batch, kv_heads, group * length, head_dim)
    logits = jnp.einsum("bnqk,bnsk->bnqs", q_BxNxGLxK, k_BxNxSxK, preferred_element_type=jnp.float32)
    if logit_cap:
        logits = softcap(logits, logit_cap)
    logits_BxNxGxLxS = logits.reshape(batch, kv_heads, group, length, -1)
    logits_BxNxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxNxGxLxS, MASKED)
    probs = jax.nn.softmax(logits_BxNxGxLxS, axis=-1).astype(v_BxNxSxK.dtype)
    out_BxNxGLxK = jnp.einsum("bnqs,bnsk->bnqk", probs.reshape(batch, kv_heads, group * length, -1), v_BxNxSxK)
    return out_BxNxGLxK.reshape(batch, heads, length, head_dim)


# causal_blocks cuts a sequence into at most this many query blocks (they grow beyond
# model.attention_block instead): each block is its own attention in the compiled step, and
# compiling bench_cpu at seq 2048 took 12.7 s with 16 blocks, 6.4 s with 4 and 4.5-5.6 s for
# "xla". Four blocks still skip 3/8 of the score matrix.
MAX_CAUSAL_BLOCKS = 4


def causal_block_bounds(length: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of each query block of causal_block_attention: blocks of `block` queries (the
    last one shorter), or of ceil(length / MAX_CAUSAL_BLOCKS) when that is larger."""
    size = max(block, -(-length // MAX_CAUSAL_BLOCKS))
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def causal_block_attention(q_BxHxLxK, k_BxNxLxK, v_BxNxLxK, mask_BxLxL, scale: float = 0.0,
                           logit_cap: float = 0.0, block: int = 128) -> jax.Array:
    """Self-attention (the keys are the queries' own tokens, in order) as the reference computes
    it, one block of queries at a time: queries [start, end) meet keys [0, end) only, since no
    query sees a later token. Each block holds all the keys its queries may see, so its softmax
    is exact and needs no running statistics; what is skipped is the upper triangle of blocks,
    (n - 1) / 2n of the score matrix for n blocks. On CPU the smaller matmuls also run faster:
    attention forward + backward at [8, 6, 256, 64] took 48 ms in blocks of 128 against 94 ms
    whole, and 182 against 368 ms at [2, 6, 1024, 64]."""
    outputs = [reference_attention(q_BxHxLxK[:, :, start:end], k_BxNxLxK[:, :, :end], v_BxNxLxK[:, :, :end],
                                   mask_BxLxL[:, start:end, :end], scale, logit_cap)
               for start, end in causal_block_bounds(q_BxHxLxK.shape[2], block)]
    return jnp.concatenate(outputs, axis=2)


def library_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, mask_BxLxS: jax.Array | None, *, causal: bool,
                      scale: float = 0.0, implementation: str = "xla") -> jax.Array:
    """`jax.nn.dot_product_attention` in our layout. mask None with causal: plain causal attention,
    which cuDNN computes without any mask tensor and skipping the blocks above the diagonal.
    Document and window masks arrive in mask (the window is a traced per-layer scalar, which the
    library's static local_window_size cannot take); cuDNN turns a mask into an additive bias."""
    to_library = lambda t: jnp.swapaxes(t, 1, 2)  # the library's layout is [B, L, heads, K]
    out_BxLxHxK = jax.nn.dot_product_attention(
        to_library(q_BxHxLxK), to_library(k_BxNxSxK), to_library(v_BxNxSxK),
        mask=None if mask_BxLxS is None else mask_BxLxS[:, None], scale=scale or None,
        is_causal=causal, implementation=implementation)
    return jnp.swapaxes(out_BxLxHxK, 1, 2)


def chunked_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, queries: TokenCoords, keys: TokenCoords,
                      window: jax.Array | None = None, *, scale: float = 0.0, logit_cap: float = 0.0,
                      chunk: int = 512) -> jax.Array:
    """The reference's result, computed one [chunk x chunk] block of scores at a time.

    A scan over query chunks, and inside it a scan over key chunks carrying FlashAttention's
    online softmax: the running max m, the running sum l of exp(logit - m) and the running
    exp-weighted sum of values, rescaled by exp(m_old - m_new) whenever the max grows. A key block
    no query of the chunk may see (above the causal diagonal, outside the window, another
    document, the unfilled cache) is skipped by `lax.cond`, which halves the work of causal rows.

    Both loop bodies are rematerialised in the backward pass (`jax.checkpoint`): the query loop's
    so the backward holds one query chunk's key loop at a time, the key loop's so that holds its
    carries rather than score blocks. Without the inner one, the cond's residuals (a score block
    per key block) were kept for every query chunk once the kernel ran inside the model's layer
    scan: memory quadratic in the sequence length again."""
    batch, heads, length, head_dim = q_BxHxLxK.shape
    kv_heads, num_keys = k_BxNxSxK.shape[1:3]
    group = heads // kv_heads
    q_chunk, k_chunk = min(chunk, length), min(chunk, num_keys)
    q_BxNxGxLxK = (q_BxHxLxK * (scale or head_dim**-0.5)).reshape(batch, kv_heads, group, length, head_dim)
    # Padding keys get an order no query reaches, so they are never seen; padding queries are cut off.
    q_blocks, query_blocks = _blocks(q_BxNxGxLxK, 3, q_chunk), _blocks(queries, 1, q_chunk)
    k_blocks, v_blocks = _blocks(k_BxNxSxK, 2, k_chunk), _blocks(v_BxNxSxK, 2, k_chunk)
    key_blocks = _blocks(keys._replace(order=_pad(keys.order, 1, k_chunk, jnp.iinfo(jnp.int32).max)), 1, k_chunk)

    def one_query_chunk(_, q_inputs):
        q_BxNxGxCxK, query_coords = q_inputs
        q_BxNxGCxK = q_BxNxGxCxK.reshape(batch, kv_heads, group * q_chunk, head_dim)

        def one_key_chunk(carry, k_inputs):
            k_BxNxCxK, v_BxNxCxK, key_coords = k_inputs
            mask_BxCqxCk = visible(query_coords, key_coords, window)

            def accumulate(carry):
                max_BxNxGxC, sum_BxNxGxC, out_BxNxGxCxK = carry
                logits = jnp.einsum("bnqk,bnsk->bnqs", q_BxNxGCxK, k_BxNxCxK, preferred_element_type=jnp.float32)
                if logit_cap:
                    logits = softcap(logits, logit_cap)
                logits = jnp.where(mask_BxCqxCk[:, None, None],
                                   logits.reshape(batch, kv_heads, group, q_chunk, -1), MASKED)
                new_max = jnp.maximum(max_BxNxGxC, logits.max(axis=-1))
                rescale = jnp.exp(max_BxNxGxC - new_max)
                probs = jnp.exp(logits - new_max[..., None])
                values = jnp.einsum("bnqs,bnsk->bnqk", probs.astype(v_BxNxCxK.dtype).reshape(
                    batch, kv_heads, group * q_chunk, -1), v_BxNxCxK, preferred_element_type=jnp.float32)
                return (new_max, sum_BxNxGxC * rescale + probs.sum(axis=-1),
                        out_BxNxGxCxK * rescale[..., None] + values.reshape(out_BxNxGxCxK.shape))

            return jax.lax.cond(mask_BxCqxCk.any(), accumulate, lambda c: c, carry), None

        start = (jnp.full((batch, kv_heads, group, q_chunk), MASKED), jnp.zeros((batch, kv_heads, group, q_chunk)),
                 jnp.zeros((batch, kv_heads, group, q_chunk, head_dim)))
        (_, sum_BxNxGxC, out_BxNxGxCxK), _ = jax.lax.scan(jax.checkpoint(one_key_chunk, prevent_cse=False), start,
                                                         (k_blocks, v_blocks, key_blocks))
        # A row that saw no key (only padding queries) has sum 0 and output 0; keep it finite.
        return None, out_BxNxGxCxK / jnp.maximum(sum_BxNxGxC, jnp.finfo(jnp.float32).tiny)[..., None]

    # prevent_cse=False: a scan body's recomputation cannot be merged with its forward anyway.
    _, out_QxBxNxGxCxK = jax.lax.scan(jax.checkpoint(one_query_chunk, prevent_cse=False), None,
                                      (q_blocks, query_blocks))
    out_BxNxGxLxK = jnp.moveaxis(out_QxBxNxGxCxK, 0, 3).reshape(batch, kv_heads, group, -1, head_dim)[:, :, :, :length]
    return out_BxNxGxLxK.reshape(batch, heads, length, head_dim).astype(v_BxNxSxK.dtype)


def _pad(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """x padded with value at the end of axis to a multiple of `multiple`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -x.shape[axis] % multiple)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(tree, axis: int, size: int):
    """Every array of tree padded along axis to a multiple of size and cut into blocks of size,
    stacked on a new leading axis (what a scan iterates over)."""
    def split(x):
        x = _pad(x, axis, size)
        x = x.reshape(*x.shape[:axis], -1, size, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)
    return jax.tree.map(split, tree)


def attend(impl: str, q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, queries: TokenCoords, keys: TokenCoords,
           window: jax.Array | None, *, self_attention: bool, scale: float = 0.0, logit_cap: float = 0.0,
           chunk: int = 512, block: int = 128) -> jax.Array:
    """Attention by the kernel `impl`: "xla", "causal_blocks", "jax_nn", "cudnn", "chunked" or "cpu_kernel".
    self_attention: the keys are the queries' own tokens, in order (training, scoring), so
    causality is the lower triangle; False when the keys are a decoding cache's slots, where
    causal_blocks has no triangle to skip and runs the reference. chunk: chunked's block of
    queries and keys; block: causal_blocks' block of queries."""
    if impl == "cpu_kernel":
        if attention_cpu.blocker(q_BxHxLxK, self_attention) is None:
            scale = scale or q_BxHxLxK.shape[-1] ** -0.5
            return attention_cpu.cpu_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, visible(queries, keys, window),
                                               scale, logit_cap)
        impl = "causal_blocks"  # several devices, a decoding step, no compiler: the same function
    if impl == "chunked":
        return chunked_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, queries, keys, window, scale=scale,
                                 logit_cap=logit_cap, chunk=chunk)
    if impl == "causal_blocks" and self_attention:
        return causal_block_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, visible(queries, keys, window), scale,
                                      logit_cap, block)
    if impl in ("xla", "causal_blocks"):
        return reference_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, visible(queries, keys, window), scale, logit_cap)
    if logit_cap:
        raise ValueError(f"attention_impl={impl!r} has no logit softcap; use 'causal_blocks', 'xla' or 'chunked'")
    only_causal = self_attention and queries.segment is None and window is None
    mask_BxLxS = None if only_causal else visible(queries, keys, window)
    return library_attention(q_BxHxLxK, k_BxNxSxK, v_BxNxSxK, mask_BxLxS, causal=self_attention, scale=scale,
                             implementation={"jax_nn": "xla", "cudnn": "cudnn"}[impl])


def on_nvidia_gpu() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and "cuda" in device.client.platform_version


def resolve_attention_impl(m: ModelConfig) -> str:
    """model.attention_impl as a kernel name: "auto" is cuDNN where it runs (an NVIDIA GPU,
    bfloat16, no softcap, a head dim it supports), the CPU kernel on CPU in float32 with a head dim
    that is a multiple of 16 (it falls back to causal_blocks where the step spans several devices),
    else "causal_blocks", which skips the blocks above the causal diagonal (README "Attention
    implementations").
    Raises ConfigError for "cudnn" off an NVIDIA GPU (config.validate checks its dtype and softcap)."""
    if m.attention_impl == "cudnn" and not on_nvidia_gpu():
        raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, but JAX runs on "
                          f"{jax.devices()[0].platform}; use model.attention_impl=auto (or xla, jax_nn, chunked)")
    if m.attention_impl != "auto":
        return m.attention_impl
    cudnn_runs = (m.dtype == "bfloat16" and not m.attn_softcap and model_head_dim(m) % 8 == 0
                  and model_head_dim(m) <= 128 and on_nvidia_gpu())
    if cudnn_runs:
        return "cudnn"
    cpu_kernel_runs = jax.devices()[0].platform == "cpu" and m.dtype == "float32" and model_head_dim(m) % 16 == 0
    return "cpu_kernel" if cpu_kernel_runs else "causal_blocks"
