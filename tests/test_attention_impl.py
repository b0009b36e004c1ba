"""Attention kernels (model.attention_impl): every kernel that runs on CPU equals the hand-written
reference ("xla") in value and gradient, inside a whole model and when decoding with a cache;
"causal_blocks" computes no score above the diagonal's blocks; "chunked" keeps memory linear in
the sequence length; "cudnn" is refused off an NVIDIA GPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import Config, ConfigError, ModelConfig, validate
from layerjax.generate import generate
from layerjax.layers.attention import Context, token_coords
from layerjax.layers.attention_kernels import attend, causal_block_bounds, chunked_attention, resolve_attention_impl
from layerjax.model.transformer import Transformer

CHUNK = 4  # small, so rows of 10 tokens span several query and key blocks and end in a partial one

# name: (batch, heads, kv heads, length, segment ids or None, window or None, logit cap)
CASES = {
    "causal": (2, 2, 2, 8, None, None, 0.0),
    "gqa": (1, 6, 2, 10, None, None, 0.0),
    "documents": (2, 4, 2, 10, [[0] * 3 + [1] * 5 + [2] * 2, [0] * 10], None, 0.0),
    "window": (2, 4, 2, 10, [[0] * 6 + [1] * 4, [0] * 10], 3, 0.0),
    "softcap": (2, 4, 2, 10, [[0] * 4 + [1] * 6, [0] * 10], 5, 2.0),
}
CPU_IMPLS = ("causal_blocks", "jax_nn", "chunked")
SOFTCAP_IMPLS = ("causal_blocks", "chunked")


@functools.cache  # the reference of a case serves every kernel's test
def forward_and_grads(impl, case, seed=0):
    batch, heads, kv_heads, length, segments, window, cap = CASES[case]
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, heads, length, 8))
    k, v = (jax.random.normal(key, (batch, kv_heads, length, 8)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    if segments is None:
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    else:  # positions restart in each document, as the packer writes them
        segments = np.asarray(segments)
        positions = np.stack([[list(row[:i]).count(row[i]) for i in range(length)] for row in segments])
    ctx = Context(jnp.asarray(positions), None if segments is None else jnp.asarray(segments))
    window = None if window is None else jnp.float32(window)

    def loss(q, k, v):
        out = attend(impl, q, k, v, *token_coords(ctx, length), window, self_attention=True, scale=0.3,
                     logit_cap=cap, chunk=CHUNK, block=CHUNK)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("impl, case", [(impl, case) for impl in CPU_IMPLS for case in CASES
                                        if case != "softcap" or impl in SOFTCAP_IMPLS])
def test_kernel_equals_reference_in_value_and_gradient(impl, case):
    out, grads = forward_and_grads(impl, case)
    ref_out, ref_grads = forward_and_grads("xla", case)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5, err_msg=f"d loss / d {name}")


def test_library_kernels_refuse_a_softcap():
    with pytest.raises(ValueError, match="no logit softcap"):
        forward_and_grads("jax_nn", "softcap")


# A model with everything attention takes: packed documents, GQA, local and global layers, a
# softcap (so jax_nn is left out of the model tests), QK-norm and RoPE.
MODEL = ModelConfig(vocab_size=61, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=32,
                    sliding_window=3, window_pattern=("local", "global"), attn_softcap=3.0, qk_norm=True,
                    attention_chunk=CHUNK, attention_block=CHUNK)


@functools.cache  # the reference serves both blockwise kernels' tests
def model_logits_and_grads(impl):
    model = Transformer(dataclasses.replace(MODEL, attention_impl=impl), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 61)
    segments = jnp.asarray([[0] * 7 + [1] * 3, [0] * 10])
    positions = jnp.asarray([list(range(7)) + list(range(3)), list(range(10))])

    def loss(model):
        logits = model(tokens, positions, segments)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return logits, nnx.state(grads, nnx.Param)


@pytest.mark.parametrize("impl", SOFTCAP_IMPLS)
def test_model_with_blockwise_attention_equals_xla_in_logits_and_gradients(impl):
    logits, grads = model_logits_and_grads(impl)
    ref_logits, ref_grads = model_logits_and_grads("xla")
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for (path, grad), (_, ref) in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(ref_grads)):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_cached_decoding_with_chunked_attention_equals_full_forward():
    """The prefill of a 6-token prompt runs chunked over 2 query and 3 key blocks of the 11-slot
    cache (a partial block each); the one-token steps after it run the reference."""
    graph, params = nnx.split(Transformer(dataclasses.replace(MODEL, attention_impl="chunked"), nnx.Rngs(0)))
    prompt = jax.random.randint(jax.random.key(2), (2, 6), 0, 61)
    tokens, logits = generate(graph, params, prompt, 5)
    full = nnx.merge(graph, params)(tokens)[0]
    np.testing.assert_allclose(logits, full[:, 5:10], rtol=1e-4, atol=1e-5)


def temp_bytes_of_chunked_gradient(length):
    """Of a gradient through two layers of chunked attention in a scan, as the model runs them
    (where a lax.cond's residuals once escaped the rematerialisation)."""
    coords = token_coords(Context(jnp.zeros((1, length), jnp.int32)), length)

    def loss(x, scales):
        layer = lambda x, scale: (chunked_attention(x * scale, x, x, *coords, chunk=64), None)
        return jax.lax.scan(layer, x, scales)[0].sum()

    args = jax.ShapeDtypeStruct((1, 2, length, 16), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_training_memory_grows_linearly_with_length():
    """4x the tokens: the whole score matrix would take 16x the memory; chunked takes about 4x."""
    short, long = temp_bytes_of_chunked_gradient(256), temp_bytes_of_chunked_gradient(1024)
    assert long < 5 * short, (short, long)


def temp_bytes_of_model_gradient(length, impl):
    """Of a model's gradient under the default remat (model.remat=auto), layers scanned."""
    m = dataclasses.replace(MODEL, attention_impl=impl, attn_softcap=0.0, sliding_window=0, window_pattern=(),
                            attention_chunk=64, max_seq_len=length, num_layers=2)
    graph, params = nnx.split(Transformer(m, nnx.Rngs(0)))
    loss = lambda params, tokens: jnp.mean(nnx.merge(graph, params)(tokens)[0])
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes


def test_chunked_model_memory_stays_linear_under_the_default_remat():
    """remat=auto keeps attention's score matmuls on CPU (save_dots) except with the chunked
    kernel: there they would be every score block, and memory quadratic again."""
    short, long = temp_bytes_of_model_gradient(256, "chunked"), temp_bytes_of_model_gradient(1024, "chunked")
    assert long < 5 * short, (short, long)


def test_cudnn_is_refused_with_a_clear_message_where_it_cannot_run():
    cfg = Config()
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):  # this machine has none
        resolve_attention_impl(dataclasses.replace(cfg.model, attention_impl="cudnn", dtype="bfloat16"))
    with pytest.raises(ConfigError, match="model.dtype=bfloat16"):
        validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="cudnn")))
    for impl in ("jax_nn", "cudnn"):
        with pytest.raises(ConfigError, match="no logit softcap"):
            validate(dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, attention_impl=impl, dtype="bfloat16", attn_softcap=50.0)))


def test_auto_is_causal_blocks_on_cpu():
    assert resolve_attention_impl(dataclasses.replace(MODEL, attention_impl="auto", attn_softcap=0.0,
                                                      dtype="bfloat16")) == "causal_blocks"


def test_causal_blocks_skip_the_upper_triangle_of_blocks():
    """Blocks of 128 queries at 512 tokens: 4 blocks compute 10 of the 16 [128, 128] score
    tiles; a row longer than 4 blocks gets larger blocks instead of more of them."""
    assert causal_block_bounds(512, 128) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert causal_block_bounds(300, 128)[-1] == (256, 300)
    assert causal_block_bounds(8192, 128) == [(0, 2048), (2048, 4096), (4096, 6144), (6144, 8192)]
    q = jax.ShapeDtypeStruct((1, 2, 512, 16), jnp.float32)
    coords = token_coords(Context(jnp.zeros((1, 512), jnp.int32)), 512)
    flops = {impl: jax.jit(lambda q: attend(impl, q, q, q, *coords, None, self_attention=True, block=128)).lower(
        q).compile().cost_analysis()["flops"] for impl in ("xla", "causal_blocks")}
    assert flops["causal_blocks"] < 0.7 * flops["xla"], flops
