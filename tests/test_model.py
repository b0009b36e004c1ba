"""Model invariants (norm schemes are in test_norms.py): causality, document masking, scanned ==
unrolled, GQA == MHA with repeated heads, RoPE is relative, cached decoding == full forward."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import ConfigError, ModelConfig, load_config
from layerjax.layers.attention import Attention, Context
from layerjax.layers.embed import apply_rope, rope_frequencies
from layerjax.layers.norms import Norm
from layerjax.model.plan import build_plan
from layerjax.model.transformer import Transformer, resolve_unroll

TINY = ModelConfig(vocab_size=61, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2,
                   max_seq_len=32, layer_norms=("0-1:post",))


def tokens(batch=2, length=12, vocab=61, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


def rms_norm(x, g, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * g


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_equals_formula(kind):
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32) * 3 + 1
    norm = Norm(16, kind, 1e-6)
    norm.scale[...] = jnp.linspace(0.5, 2.0, 16)
    g = np.linspace(0.5, 2.0, 16)
    if kind == "rms":
        expected = rms_norm(x, g)
    else:
        centered = x - x.mean(-1, keepdims=True)
        expected = centered / np.sqrt(centered.var(-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_plan_segments_and_table():
    plan = build_plan(dataclasses.replace(TINY, num_layers=6, layer_norms=("0-1:post", "5:post")))
    assert [(s.spec.norm, s.first_layer, s.num_layers) for s in plan.segments] == [
        ("post", 0, 2), ("pre", 2, 3), ("post", 5, 1)]
    table = plan.table().splitlines()
    assert len(table) == 2 + 6 and "2 (layers 5-5)" in table[-1]


# With canon at every position the check covers the plain model too; without canon it waits for -m slow.
@pytest.mark.parametrize("canon", [pytest.param("", marks=pytest.mark.slow), "ABCD"])
def test_scanned_equals_unrolled_logits_and_grads(canon):
    m = dataclasses.replace(TINY, canon=canon)
    scanned = Transformer(m, nnx.Rngs(0))
    unrolled = Transformer(dataclasses.replace(m, scan_layers=False), nnx.Rngs(0))
    assert len(scanned.plan.segments) == 2
    graph_s, params = nnx.split(scanned, nnx.Param)
    graph_u, _ = nnx.split(unrolled, nnx.Param)
    toks = tokens()

    def loss(graph, p):
        logits, _ = nnx.merge(graph, p)(toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, toks[..., None], -1)[..., 0])

    for graph in (graph_s, graph_u):
        assert jax.jit(lambda p, g=graph: nnx.merge(g, p)(toks)[0])(params).shape == (2, 12, 61)
    chex.assert_trees_all_close(nnx.merge(graph_s, params)(toks)[0], nnx.merge(graph_u, params)(toks)[0],
                                rtol=1e-5, atol=1e-5)
    grads_s = jax.grad(lambda p: loss(graph_s, p))(params)
    grads_u = jax.grad(lambda p: loss(graph_u, p))(params)
    chex.assert_trees_all_close(grads_s, grads_u, rtol=1e-4, atol=1e-6)


def test_scan_unroll_leaves_logits_and_grads_unchanged():
    """model.scan_unroll only regroups the loop: 2 layers per iteration (3 = 2 + 1, the rest
    handled) and the whole stack in one body give the one-layer scan's logits and gradients."""
    m = dataclasses.replace(TINY, num_layers=3, layer_norms=(), canon="")
    toks = tokens()
    params = nnx.split(Transformer(m, nnx.Rngs(0)), nnx.Param)[1]

    def logits_and_grads(unroll):
        g = nnx.split(Transformer(dataclasses.replace(m, scan_unroll=unroll), nnx.Rngs(0)), nnx.Param)[0]
        forward = lambda p: nnx.merge(g, p)(toks)[0]
        scans = [e for e in jax.make_jaxpr(forward)(params).eqns if e.primitive.name == "scan"]
        assert [e.params["unroll"] for e in scans] == [unroll or 3]  # lax.scan's unroll=True: the length
        return jax.jit(lambda p: (forward(p), jax.grad(lambda p: jnp.mean(forward(p) ** 2))(p)))(params)

    reference = logits_and_grads(1)
    for unroll in (2, 0):
        chex.assert_trees_all_close(logits_and_grads(unroll), reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="model.scan_unroll=-1 must be >= 0"):
        load_config("default", ["model.scan_unroll=-1"])
    with pytest.raises(ConfigError, match="model.scan_unroll=fast must be >= 0: .*; or auto"):
        load_config("default", ["model.scan_unroll=fast"])


def test_scan_unroll_auto_unrolls_short_stacks_on_cpu_only():
    """auto: the whole segment in one body on CPU up to 12 layers (no stacked copies of saved
    activations), one layer per iteration on accelerators and for deeper models."""
    auto = load_config("default", ["model.num_layers=12"]).model
    assert auto.scan_unroll == "auto" and load_config("default", ["model.scan_unroll=2"]).model.scan_unroll == 2
    assert resolve_unroll(auto, "cpu") == 0
    assert resolve_unroll(auto, "gpu") == resolve_unroll(auto, "tpu") == 1
    assert resolve_unroll(dataclasses.replace(auto, num_layers=13), "cpu") == 1
    assert resolve_unroll(dataclasses.replace(auto, scan_unroll=3), "cpu") == 3
    # This process is CPU: the model's scan of 2 layers runs as one body.
    m = dataclasses.replace(TINY, num_layers=2, layer_norms=(), canon="", scan_unroll="auto")
    graph, params = nnx.split(Transformer(m, nnx.Rngs(0)), nnx.Param)
    scans = [e for e in jax.make_jaxpr(lambda p: nnx.merge(graph, p)(tokens())[0])(params).eqns
             if e.primitive.name == "scan"]
    assert [e.params["unroll"] for e in scans] == [2]


@pytest.mark.parametrize("positions", ["rope", "learned", "none"])
def test_causality(positions):
    model = Transformer(dataclasses.replace(TINY, positions=positions), nnx.Rngs(0))
    toks = tokens()
    changed = toks.at[:, 7].set((toks[:, 7] + 1) % 61)
    a, _ = model(toks)
    b, _ = model(changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_document_mask_isolates_packed_documents():
    model = Transformer(TINY, nnx.Rngs(0))
    toks = tokens(batch=1, length=12)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    alone, _ = model(toks[:, 5:], positions[:, 5:], segments[:, 5:])
    packed, _ = model(toks, positions, segments)
    other_first_doc = toks.at[:, :5].set((toks[:, :5] + 3) % 61)
    packed2, _ = model(other_first_doc, positions, segments)
    np.testing.assert_allclose(packed[:, 5:], alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], packed2[:, 5:], rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    kw = dict(rope_freqs=rope_frequencies(8, 1e4), qk_norm=False, norm_type="rms", norm_eps=1e-6, init_std=0.1)
    gqa = Attention(32, 4, 2, 8, rngs=nnx.Rngs(0), **kw)
    mha = Attention(32, 4, 4, 8, rngs=nnx.Rngs(1), **kw)
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)  # query heads 2g, 2g+1 share kv head g
    mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
    x = jax.random.normal(jax.random.key(3), (2, 6, 32))
    ctx = Context(jnp.broadcast_to(jnp.arange(6), (2, 6)))
    np.testing.assert_allclose(gqa(x, ctx)[0], mha(x, ctx)[0], rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))  # [B, H, L, K]
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    freqs = rope_frequencies(16, 1e4)
    score = lambda pq, pk: jnp.sum(apply_rope(q, jnp.array([[pq]]), freqs) * apply_rope(k, jnp.array([[pk]]), freqs))
    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-4)
    assert not np.isclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cached_decoding_equals_full_forward(positions):
    m = dataclasses.replace(TINY, positions=positions, qk_norm=True)
    model = Transformer(m, nnx.Rngs(0))
    toks = tokens(length=10)
    full, _ = model(toks)
    cache = model.init_cache(batch=2, max_len=16)
    prefill, cache = model(toks[:, :4], cache=cache, cache_index=jnp.int32(0))
    steps = [prefill]
    for t in range(4, 10):  # then one token at a time
        logits, cache = model(toks[:, t:t + 1], cache=cache, cache_index=jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_matmuls", "save_dots", "auto"])
def test_remat_leaves_gradients_unchanged(remat):
    plain = Transformer(dataclasses.replace(TINY, remat="none"), nnx.Rngs(0))
    graph, params = nnx.split(plain, nnx.Param)
    graph_r, _ = nnx.split(Transformer(dataclasses.replace(TINY, remat=remat), nnx.Rngs(0)), nnx.Param)
    toks = tokens()
    grad = lambda g: jax.grad(lambda p: jnp.mean(nnx.merge(g, p)(toks)[0] ** 2))(params)
    chex.assert_trees_all_close(grad(graph), grad(graph_r), rtol=1e-5, atol=1e-7)


def test_untied_head_and_bfloat16_compute():
    m = dataclasses.replace(TINY, tie_embeddings=False, dtype="bfloat16", use_bias=True, mlp="gelu", norm_type="layer")
    model = Transformer(m, nnx.Rngs(0))
    logits, _ = model(tokens())
    chex.assert_shape(logits, (2, 12, 61))
    assert logits.dtype == jnp.float32 and model.head is not None
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_auto_remat_is_save_dots_on_cpu_and_explicit_choices_pass_through():
    from layerjax.model.transformer import resolve_remat

    assert jax.devices()[0].platform == "cpu" and TINY.remat == "auto"
    scanned = dataclasses.replace(TINY, scan_unroll=1)
    assert resolve_remat(scanned) == "save_dots"
    # save_dots would keep the chunked kernel's score blocks (test_attention_impl checks the memory)
    assert resolve_remat(dataclasses.replace(scanned, attention_impl="chunked")) == "save_matmuls"
    # Unrolled on CPU (scan_unroll=auto up to 12 layers, or scan_layers=false) XLA merges any
    # recomputation back into the forward: auto keeps no checkpoint there.
    assert resolve_remat(TINY) == resolve_remat(dataclasses.replace(scanned, scan_layers=False)) == "none"
    assert resolve_remat(dataclasses.replace(TINY, num_layers=13)) == "save_dots"
    explicit = ("none", "full", "save_matmuls", "save_dots")
    assert [resolve_remat(dataclasses.replace(TINY, remat=r)) for r in explicit] == list(explicit)
