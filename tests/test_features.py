"""Model features that Hugging Face families need, each against its equation in NumPy: GeGLU,
(1+w) norms, full-width QK-norm, attention scale and soft-caps, sliding windows (packed documents
and decoding), partial and scaled RoPE, embedding scale, per-projection biases, DeepNorm's alpha,
bfloat16 parameters; then a model using them all: local/global layers in one scanned segment,
scanned == unrolled, and cached decoding == full forward."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import ModelConfig, d_ff, load_config
from layerjax.layers.attention import Attention, Context, attention_mask
from layerjax.layers.canon import canon_widths
from layerjax.layers.embed import Embedding, apply_rope, rope_frequencies
from layerjax.layers.mlp import MLP
from layerjax.layers.norms import Norm
from layerjax.model.block import Block
from layerjax.model.plan import NO_WINDOW, LayerSpec, build_plan
from layerjax.model.transformer import Transformer
from layerjax.train.flops import matmul_params
from conftest import TINY_RUN

RNG = np.random.default_rng(0)


def normal(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def abstract_graph(m: ModelConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))), nnx.Param)[0]


def random_params(abstract, std=0.2, dtype=jnp.float32):
    """Every parameter drawn N(0, std^2) from NumPy: far quicker than compiling the model's init,
    and it moves norm gains and biases off their init values, so a misapplied one shows."""
    return jax.tree.map(lambda a: jnp.asarray(RNG.normal(size=a.shape) * std, dtype), abstract)


def np_rms(x, g, eps, axes, offset):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt(np.mean(x**2, axis=axes, keepdims=True) + eps)
    return y * ((1 + g) if offset else g)


def np_rope(x_BxLxHxK, pos_BxL, rot, theta):
    """Rotates pairs (i, i + rot/2) of the first rot dims by pos * theta^(-2i/rot)."""
    half = rot // 2
    angle_BxLx1xR = (pos_BxL[..., None] * theta ** (-2 * np.arange(half) / rot))[:, :, None, :]
    x1, x2, rest = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:rot], x_BxLxHxK[..., rot:]
    cos, sin = np.cos(angle_BxLx1xR), np.sin(angle_BxLx1xR)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def np_mask(pos_BxL, seg_BxL, window):
    """Causal, same document, and key position j > query position i - window."""
    n = pos_BxL.shape[1]
    causal = np.tril(np.ones((n, n), bool))[None]
    same_doc = seg_BxL[:, :, None] == seg_BxL[:, None, :]
    in_window = pos_BxL[:, None, :] > pos_BxL[:, :, None] - window
    return causal & same_doc & in_window


# ---------------------------------------------------------------- attention


def attention_reference(attn, x, pos, seg, *, rot, theta, scale, cap, window, scope, eps):
    """Attention in float64 NumPy from the module's parameters."""
    p = {name: np.asarray(v[...], np.float64) for name, v in nnx.state(attn, nnx.Param).flat_state()
         for name in ["_".join(map(str, name))]}
    proj = lambda w, b: np.einsum("bld,dhk->blhk", x, p[w]) + p.get(b, 0.0)
    q, k, v = proj("wq", "bq"), proj("wk", "bk"), proj("wv", "bv")
    axes = (-1,) if scope == "head" else (-2, -1)
    q = np_rms(q, p["q_norm_scale"], eps, axes, offset=True)
    k = np_rms(k, p["k_norm_scale"], eps, axes, offset=True)
    q, k = np_rope(q, pos, rot, theta), np_rope(k, pos, rot, theta)
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head h reads kv head h // G
    logits = scale * np.einsum("bqhk,bshk->bhqs", q, k)
    logits = cap * np.tanh(logits / cap)
    logits = np.where(np_mask(pos, seg, window)[:, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, p["wo"]) + p.get("bo", 0.0)


@pytest.mark.parametrize("scope, biases", [("head", ("q", "k", "v")), ("full", ("v", "o"))])
def test_attention_equals_reference_with_window_caps_scale_qk_norm_and_partial_rope(scope, biases):
    """Packed documents, a window of 3, soft-capped logits, a custom scale, (1+w) QK-norm over a
    head or over all heads, RoPE on half of each head, and some biases."""
    eps, theta = 1e-6, 100.0
    attn = Attention(32, 4, 2, 8, rope_freqs=rope_frequencies(4, theta), qk_norm=True, qk_norm_scope=scope,
                     norm_type="rms", norm_eps=eps, norm_offset=True, biases=biases, scale=0.3, logit_cap=2.0,
                     init_std=0.3, rngs=nnx.Rngs(0))
    for _, variable in nnx.iter_graph(attn):  # non-trivial norm gains and biases
        if isinstance(variable, nnx.Param) and variable.ndim <= 2:
            variable[...] = jnp.asarray(normal(*variable.shape, scale=0.5))
    assert attn.q_norm.scale.shape == ((8,) if scope == "head" else (4, 8))
    x = normal(2, 12, 32)
    seg = np.array([[0] * 5 + [1] * 7, [0] * 12])
    pos = np.array([list(range(5)) + list(range(7)), list(range(12))])
    ctx = Context(jnp.asarray(pos), jnp.asarray(seg))
    out, _ = jax.jit(lambda h: attn(h, ctx, window=jnp.float32(3)))(jnp.asarray(x))
    expected = attention_reference(attn, x, pos, seg, rot=4, theta=theta, scale=0.3, cap=2.0, window=3,
                                   scope=scope, eps=eps)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


def test_sliding_window_mask_packed_and_decoding():
    seg = jnp.array([[0] * 4 + [1] * 6])
    pos = jnp.array([list(range(4)) + list(range(6))])
    mask = attention_mask(Context(pos, seg), 10, jnp.float32(3))
    np.testing.assert_array_equal(mask, np_mask(np.asarray(pos), np.asarray(seg), 3))
    # query 7 is position 3 of document 1: it sees itself and the two keys before it, no further
    assert list(np.flatnonzero(mask[0, 7])) == [5, 6, 7]
    # decoding: a query at position 9 sees cache slots 7, 8, 9 out of 16
    decode = attention_mask(Context(jnp.array([[9]]), cache_index=jnp.int32(9)), 16, jnp.float32(3))
    assert list(np.flatnonzero(decode[0, 0])) == [7, 8, 9]
    # no window: everything causal
    full = attention_mask(Context(jnp.array([[9]]), cache_index=jnp.int32(9)), 16, jnp.float32(NO_WINDOW))
    assert list(np.flatnonzero(full[0, 0])) == list(range(10))


# ---------------------------------------------------------------- norms, MLP, embeddings, RoPE


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_offset_norm_is_one_plus_w(kind):
    norm = Norm(16, kind, 1e-6, offset=True)
    np.testing.assert_array_equal(norm.scale[...], 0.0)  # (1 + 0): the identity gain at init
    w = normal(16, scale=0.3)
    norm.scale[...] = jnp.asarray(w)
    x = normal(2, 3, 16, scale=3.0) + 1
    centered = x - x.mean(-1, keepdims=True) if kind == "layer" else x
    expected = np_rms(centered, w, 1e-6, -1, offset=True)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_full_width_norm_normalises_all_heads_together():
    norm = Norm((4, 8), "rms", 1e-6, axis_name=("heads", "head_dim"))
    g = normal(4, 8) + 1
    norm.scale[...] = jnp.asarray(g)
    assert norm.scale.get_metadata()["axes"] == ("heads", "head_dim")
    x = normal(2, 3, 4, 8) * np.arange(1, 5)[:, None]  # heads of different sizes
    flat = np_rms(x.reshape(2, 3, 32), g.reshape(32), 1e-6, -1, offset=False)  # OLMo-2: one norm over H*K
    np.testing.assert_allclose(norm(jnp.asarray(x)), flat.reshape(2, 3, 4, 8), rtol=1e-5, atol=1e-5)


def test_every_norm_of_an_offset_model_is_offset():
    m = ModelConfig(vocab_size=37, num_layers=2, d_model=32, num_heads=4, norm="peri", embed_norm=True,
                    qk_norm=True, qk_norm_scope="full", norm_offset=True)
    model = nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0)))
    norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, Norm)]
    assert len(norms) == 2 + 6 and all(n.offset for n in norms)  # embed, final; 4 sublayer + 2 QK per layer


def test_geglu_equals_formula_and_counts_like_swiglu():
    mlp = MLP(16, 24, "geglu", (), 0.3, nnx.Rngs(0))
    x = normal(2, 5, 16)
    gate, up = x @ np.asarray(mlp.w_gate[...], np.float64), x @ np.asarray(mlp.w_up[...], np.float64)
    gelu_tanh = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    expected = (gelu_tanh(gate) * up) @ np.asarray(mlp.w_out[...], np.float64)
    np.testing.assert_allclose(mlp(jnp.asarray(x))[0], expected, rtol=1e-5, atol=1e-6)
    m = ModelConfig(vocab_size=37, d_model=64, num_heads=4, mlp="geglu", canon="D")
    swiglu = dataclasses.replace(m, mlp="swiglu")
    assert d_ff(m) == d_ff(swiglu) and canon_widths(m)["D"] == 2 * d_ff(m)
    assert matmul_params(m) == matmul_params(swiglu)


def test_embed_scale_rounds_the_constant_to_the_compute_dtype_and_spares_the_head():
    embed = Embedding(11, 40, 1.0, nnx.Rngs(0), scaled=True)
    tokens = jnp.array([[1, 5, 7]])
    table = np.asarray(embed.table[...])
    np.testing.assert_allclose(embed(tokens, jnp.float32), table[[1, 5, 7]][None] * math.sqrt(40), rtol=1e-6)
    bf16 = embed(tokens, jnp.bfloat16)
    constant = jnp.asarray(math.sqrt(40), jnp.bfloat16)  # 6.3125, not 6.3246
    np.testing.assert_array_equal(bf16, jnp.asarray(table[[1, 5, 7]][None], jnp.bfloat16) * constant)
    x = normal(1, 2, 40)
    np.testing.assert_allclose(embed.attend(jnp.asarray(x)), x @ table.T, rtol=1e-5, atol=1e-5)


def test_partial_rope_rotates_only_the_first_dims():
    x = normal(2, 3, 5, 8)  # [B, H, L, K]
    pos = np.array([[0, 1, 2, 7, 30], [3, 3, 4, 9, 11]])
    out = apply_rope(jnp.asarray(x), jnp.asarray(pos), rope_frequencies(4, 500.0))
    expected = np_rope(np.swapaxes(x, 1, 2), pos, 4, 500.0)  # NumPy's is [B, L, H, K]
    np.testing.assert_allclose(out, np.swapaxes(expected, 1, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])


def llama3_reference(dims, theta, factor, low, high, original):
    """Llama 3.1's frequency rule in float64, written from its definition."""
    inv_freq = theta ** (-np.arange(0, dims, 2) / dims)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelen < original / high, inv_freq, np.where(wavelen > original / low, inv_freq / factor, blended))


def test_rope_scaling_frequencies():
    base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(rope_frequencies(16, 1e4), base, rtol=1e-6)
    np.testing.assert_allclose(rope_frequencies(16, 1e4, "linear", 4.0), base / 4, rtol=1e-6)
    # original length 64: wavelengths under 16 stay, over 64 stretch by 8, the band between blends
    ours = rope_frequencies(32, 5e5, "llama3", 8.0, 1.0, 4.0, 64)
    expected = llama3_reference(32, 5e5, 8.0, 1.0, 4.0, 64)
    wavelen = 2 * np.pi / (5e5 ** (-np.arange(0, 32, 2) / 32))
    assert (wavelen < 16).any() and (wavelen > 64).any() and ((wavelen > 16) & (wavelen < 64)).any()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert ours.dtype == np.float32


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_frequencies_match_transformers(rope):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    import transformers

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                                      rope_parameters={"rope_theta": 5e5, "partial_rotary_factor": 0.5, **rope})
    theirs = rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")[0].numpy()
    ours = rope_frequencies(16, 5e5, rope["rope_type"], rope["factor"], rope.get("low_freq_factor", 1.0),
                            rope.get("high_freq_factor", 4.0), rope.get("original_max_position_embeddings", 8192))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- biases, DeepNorm, parameter dtype


@pytest.mark.parametrize("use_bias, projections, expected", [
    (False, ("q", "k", "v"), {"attn.bq", "attn.bk", "attn.bv"}),  # Qwen2
    (False, ("o", "up", "down"), {"attn.bo", "mlp.b_in", "mlp.b_out"}),
    (True, (), {"attn.bq", "attn.bk", "attn.bv", "attn.bo", "mlp.b_in", "mlp.b_out",
                "attn_norm.bias", "mlp_norm.bias"}),  # GPT-2: every projection and norm
])
def test_bias_projections_create_exactly_the_named_biases(use_bias, projections, expected):
    m = ModelConfig(vocab_size=37, d_model=32, num_heads=4, use_bias=use_bias, bias_projections=projections)
    block = nnx.eval_shape(lambda: Block(m, LayerSpec("pre"), nnx.Rngs(0)))
    names = {".".join(map(str, path)) for path, _ in nnx.state(block, nnx.Param).flat_state()}
    assert {n for n in names if n.split(".")[-1].startswith("b")} == expected


def test_deepnorm_alpha_overrides_the_residual_scale_only():
    m = ModelConfig(vocab_size=37, num_layers=4, d_model=32, num_heads=4, norm="deepnorm")
    default, custom = build_plan(m), build_plan(dataclasses.replace(m, deepnorm_alpha=0.7))
    np.testing.assert_allclose(default.scalars["residual_scale"], 8**0.25, rtol=1e-6)
    np.testing.assert_allclose(custom.scalars["residual_scale"], 0.7, rtol=1e-6)
    assert custom.specs == default.specs  # beta (the init scale) is DeepNorm's (8L)^(-1/4) still


def test_bfloat16_parameters_run_with_float32_compute():
    from layerjax.train.state import build_setup

    cfg = load_config(None, TINY_RUN + ["model.vocab_size=37", "model.param_dtype=bfloat16", "model.canon=ABCD",
                                        "model.use_bias=true", "model.embed_norm=true", "model.positions=learned"])
    setup = build_setup(cfg)  # its abstract state: what shardings, the optimizer and checkpoints follow
    bf16 = jnp.dtype(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(setup.abstract_state.params)} == {bf16}
    assert {x.dtype for x in jax.tree.leaves(setup.abstract_state.opt_state)} == {bf16, jnp.dtype(jnp.int32)}
    params = random_params(setup.abstract_state.params, dtype=jnp.bfloat16)
    toks = jax.random.randint(jax.random.key(0), (2, 8), 0, 37)
    forward = jax.jit(lambda p: nnx.merge(setup.graphdef, p).forward(toks, probe="hidden"))
    logits, _, hidden = forward(params)
    assert logits.dtype == hidden.dtype == jnp.float32
    # float32 compute: the same values stored in float32 give the same logits
    as_f32, _, _ = forward(jax.tree.map(lambda p: p.astype(jnp.float32), params))
    np.testing.assert_allclose(logits, as_f32, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the features together, in a model


FEATURES = ModelConfig(
    vocab_size=37, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=16, norm="peri",
    mlp="geglu", norm_offset=True, embed_scale=True, attn_scale=0.2, attn_softcap=3.0, final_softcap=4.0,
    sliding_window=3, window_pattern=("local", "global"), qk_norm=True, qk_norm_scope="full",
    bias_projections=("q", "k", "v"), rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=8,
    rope_fraction=0.5, init_std=0.2)


@pytest.fixture(scope="module")
def features_model():
    """FEATURES' graph, parameters, tokens, and its jitted full forward: logits and hidden states."""
    graph, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(FEATURES, nnx.Rngs(0))), nnx.Param)
    params = random_params(abstract)
    toks = jax.random.randint(jax.random.key(2), (2, 12), 0, 37)
    logits, _, hidden = jax.jit(lambda p, t: nnx.merge(graph, p).forward(t, probe="hidden"))(params, toks)
    return graph, params, toks, logits, hidden


def test_local_and_global_layers_are_one_segment_with_a_window_scalar():
    plan = build_plan(FEATURES)
    assert len(plan.segments) == 1
    assert list(plan.scalars["window"]) == [3, NO_WINDOW, 3, NO_WINDOW]
    rows = plan.table().splitlines()
    column = rows[0].index("window")
    assert [row[column:].split()[0] for row in rows[2:]] == ["3", "-", "3", "-"]
    assert list(build_plan(dataclasses.replace(FEATURES, window_pattern=())).scalars["window"]) == [3] * 4


def test_features_model_scanned_equals_unrolled(features_model):
    graph, params, toks, full, _ = features_model
    graph_u = abstract_graph(dataclasses.replace(FEATURES, scan_layers=False))
    logits = jax.jit(lambda p, t: nnx.merge(graph_u, p)(t)[0])(params, toks)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)


def test_features_model_cached_decoding_equals_full_forward(features_model):
    """The window (3) is shorter than the sequence (12), so decoding must apply it to cache slots."""
    graph, params, toks, full, _ = features_model
    step = jax.jit(lambda p, t, c, i: nnx.merge(graph, p)(t, cache=c, cache_index=i))
    cache = nnx.merge(graph, params).init_cache(batch=2, max_len=16)
    logits, cache = step(params, toks[:, :5], cache, jnp.int32(0))  # prefill, then one token at a time
    steps = [logits]
    for t in range(5, 12):
        logits, cache = step(params, toks[:, t:t + 1], cache, jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


def test_final_softcap_and_tied_head_of_the_features_model(features_model):
    """logits = cap * tanh(N(h) E^T / cap), N the final (1+w) norm, E the unscaled embedding table."""
    _, params, _, logits, hidden = features_model
    final = np_rms(hidden[-1], np.asarray(params["final_norm"]["scale"][...]), FEATURES.norm_eps, -1, offset=True)
    raw = final @ np.asarray(params["embed"]["table"][...], np.float64).T
    np.testing.assert_allclose(logits, 4.0 * np.tanh(raw / 4.0), rtol=1e-5, atol=1e-5)
    assert np.abs(raw).max() > 4.0  # the cap bites
