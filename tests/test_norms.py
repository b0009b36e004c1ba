"""Norm schemes: each block equals its equation, the plan each scheme compiles to, LayerNorm
scaling at init, and the depth trends the Mix-LN and Curse-of-Depth papers report at init."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerjax.config import ConfigError, ModelConfig, load_config
from layerjax.layers.attention import Attention, Context
from layerjax.layers.mlp import MLP
from layerjax.model.block import Block
from layerjax.model.plan import build_plan, deepnorm_constants, scheme_layer
from layerjax.model.transformer import Transformer

M = ModelConfig(vocab_size=61, num_layers=4, d_model=32, num_heads=4, max_seq_len=32)
SCHEMES = ["pre", "post", "peri", "reordered", "lns", "deepnorm", "none"]


def rms_norm(x, g, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * np.asarray(g)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_block_equals_scheme_equation(scheme):
    layer = 2  # 0-based, so l = 3 in the papers' 1-based notation
    spec, _ = scheme_layer(scheme, layer, M.num_layers, "")
    scalars = {k: jnp.float32(v[layer]) for k, v in build_plan(dataclasses.replace(M, norm=scheme)).scalars.items()}
    block = Block(M, spec, nnx.Rngs(0))
    norms = [n for n in (block.attn_norm, block.mlp_norm, block.attn_out_norm, block.mlp_out_norm) if n is not None]
    for i, norm in enumerate(norms):  # distinct non-trivial gains so a misplaced norm shows
        norm.scale[...] = jax.random.uniform(jax.random.key(10 + i), (32,), minval=0.5, maxval=1.5)
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 32)) * 2.0)
    ctx = Context(jnp.broadcast_to(jnp.arange(8), (2, 8)))
    attn = lambda h: np.asarray(block.attn(jnp.asarray(h, jnp.float32), ctx)[0], np.float64)
    mlp = lambda h: np.asarray(block.mlp(jnp.asarray(h, jnp.float32))[0], np.float64)
    N = {name: (lambda h, n=n: rms_norm(h, n.scale[...])) for name, n in
         [("attn", block.attn_norm), ("mlp", block.mlp_norm), ("attn_out", block.attn_out_norm),
          ("mlp_out", block.mlp_out_norm)] if n is not None}
    if scheme == "pre":  # x + F(N(x))
        h = x + attn(N["attn"](x))
        expected = h + mlp(N["mlp"](h))
    elif scheme == "lns":  # x + F(N(x) / sqrt(l))
        h = x + attn(N["attn"](x) / math.sqrt(3))
        expected = h + mlp(N["mlp"](h) / math.sqrt(3))
    elif scheme == "post":  # N(x + F(x))
        h = N["attn"](x + attn(x))
        expected = N["mlp"](h + mlp(h))
    elif scheme == "deepnorm":  # N(alpha x + F(x)), alpha = (2L)^(1/4)
        alpha = (2 * 4) ** 0.25
        h = N["attn"](alpha * x + attn(x))
        expected = N["mlp"](alpha * h + mlp(h))
    elif scheme == "peri":  # x + N_out(F(N_in(x)))
        h = x + N["attn_out"](attn(N["attn"](x)))
        expected = h + N["mlp_out"](mlp(N["mlp"](h)))
    elif scheme == "reordered":  # x + N(F(x))
        h = x + N["attn"](attn(x))
        expected = h + N["mlp"](mlp(h))
    else:  # none: x + F(x), and no norm parameters at all
        assert not N
        h = x + attn(x)
        expected = h + mlp(h)
    out, _ = block(jnp.asarray(x), scalars, ctx)
    np.testing.assert_allclose(out, expected, rtol=3e-5, atol=3e-5)


def _normalize_by_formula(x, gain, bias, centered, eps, offset):
    """The norm as a formula, for JAX to differentiate on its own."""
    axes = tuple(range(-gain.ndim, 0))
    x32 = x.astype(jnp.float32)
    if centered:
        x32 = x32 - jnp.mean(x32, axis=axes, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=axes, keepdims=True) + eps) * (1.0 + gain if offset else gain)
    return (y if bias is None else y + bias).astype(x.dtype)


@pytest.mark.parametrize("centered, offset, bias, gain_shape", [
    (False, False, False, (16,)),  # RMSNorm
    (True, False, True, (16,)),  # LayerNorm with its shift
    (False, True, False, (4, 8)),  # Gemma's 1 + g, over two trailing axes (a full-width QK-norm)
])
def test_norm_gradient_equals_jax_derivative_of_the_formula(centered, offset, bias, gain_shape):
    from layerjax.layers.norms import normalize

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (3, 5, *gain_shape)) * 3 + 1
    gain = jax.random.uniform(keys[1], gain_shape, minval=0.5, maxval=2.0)
    shift = jax.random.normal(keys[2], gain_shape) if bias else None
    weights = jax.random.normal(keys[3], x.shape)
    loss = lambda f: (lambda x, g, b: jnp.sum(f(x, g, b, centered, 1e-6, offset) * weights))
    args = (x, gain, shift)
    argnums = (0, 1, 2) if bias else (0, 1)
    chex.assert_trees_all_close(normalize(*args, centered, 1e-6, offset),
                                _normalize_by_formula(*args, centered, 1e-6, offset), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.grad(loss(normalize), argnums)(*args),
                                jax.grad(loss(_normalize_by_formula), argnums)(*args), rtol=1e-5, atol=1e-5)
    half = jax.grad(lambda x: jnp.sum(normalize(x, gain, shift, centered, 1e-6, offset)))(x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16


def test_deepnorm_constants_and_init_scale():
    alpha, beta = deepnorm_constants(12)
    assert alpha == pytest.approx(24**0.25) and beta == pytest.approx(96**-0.25)
    m = dataclasses.replace(M, d_model=128, num_heads=4, init_std=0.02)
    spec, scalars = scheme_layer("deepnorm", 0, 4, "")
    assert scalars == {"residual_scale": pytest.approx(8**0.25)}
    block = Block(m, spec, nnx.Rngs(0))
    beta4 = 32**-0.25
    std = lambda p: float(jnp.std(p[...]))
    # DeepNet scales the value, output and MLP weights by beta; queries and keys keep the base std.
    for param in (block.attn.wv, block.attn.wo, block.mlp.w_gate, block.mlp.w_up, block.mlp.w_out):
        assert std(param) == pytest.approx(0.02 * beta4, rel=0.1)
    for param in (block.attn.wq, block.attn.wk):
        assert std(param) == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("num_layers,alpha", [(8, 0.25), (12, 0.25), (10, 0.5), (4, 0.0)])
def test_mix_ln_plan(num_layers, alpha):
    plan = build_plan(dataclasses.replace(M, num_layers=num_layers, norm="mix", mix_alpha=alpha))
    num_post = math.floor(alpha * num_layers)
    assert [s.norm for s in plan.specs] == ["post"] * num_post + ["pre"] * (num_layers - num_post)
    expected = [("post", 0, num_post)] * (num_post > 0) + [("pre", num_post, num_layers - num_post)]
    assert [(s.spec.norm, s.first_layer, s.num_layers) for s in plan.segments] == expected


def test_mix_ln_scanned_equals_unrolled():
    m = dataclasses.replace(M, num_layers=8, norm="mix")
    scanned = Transformer(m, nnx.Rngs(0))
    unrolled = Transformer(dataclasses.replace(m, scan_layers=False), nnx.Rngs(0))
    assert len(scanned.plan.segments) == 2
    graph_s, params = nnx.split(scanned, nnx.Param)
    graph_u, _ = nnx.split(unrolled, nnx.Param)
    toks = jax.random.randint(jax.random.key(0), (2, 12), 0, 61)
    loss = lambda g: lambda p: jnp.mean(nnx.merge(g, p)(toks)[0] ** 2)
    chex.assert_trees_all_close(nnx.merge(graph_s, params)(toks)[0], nnx.merge(graph_u, params)(toks)[0],
                                rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.grad(loss(graph_s))(params), jax.grad(loss(graph_u))(params),
                                rtol=1e-4, atol=1e-7)


def test_lns_and_deepnorm_are_scalars_not_segments():
    for scheme in ("lns", "deepnorm"):
        plan = build_plan(dataclasses.replace(M, num_layers=12, norm=scheme))
        assert len(plan.segments) == 1, scheme
    lns = build_plan(dataclasses.replace(M, num_layers=12, norm="lns")).scalars["norm_scale"]
    np.testing.assert_allclose(lns, 1 / np.sqrt(np.arange(1, 13)), rtol=1e-6)
    # LNS is Pre-LN with a scalar, so a hand-made pre/lns mix is still one segment.
    mixed = build_plan(dataclasses.replace(M, num_layers=6, norm="pre", layer_norms=("3-5:lns",)))
    assert len(mixed.segments) == 1 and list(mixed.scalars["norm_scale"][:3]) == [1, 1, 1]


def test_per_layer_overrides_merge_neighbours_and_reject_bad_entries():
    plan = build_plan(dataclasses.replace(M, num_layers=6, norm="mix", mix_alpha=0.5,
                                          layer_norms=("2:post", "4-5:peri")))
    assert [(s.spec.norm, s.first_layer, s.num_layers) for s in plan.segments] == [
        ("post", 0, 3), ("pre", 3, 1), ("peri", 4, 2)]
    for bad, message in [("0-1:mix", "not one of"), ("3-9:pre", "num_layers"), ("pre", "first-last")]:
        with pytest.raises(ConfigError, match=message):
            build_plan(dataclasses.replace(M, layer_norms=(bad,)))
    with pytest.raises(ConfigError, match="mix_alpha"):
        load_config(None, ["model.norm=mix", "model.mix_alpha=1.5"])


def _record_sublayer_input_rms(monkeypatch):
    """Makes attention and MLP record the RMS of their input (the norm output under Pre-LN)."""
    seen = {"attn": [], "mlp": []}
    attn_call, mlp_call = Attention.__call__, MLP.__call__

    def attn(self, x, *args, **kw):
        seen["attn"].append(float(jnp.sqrt(jnp.mean(x**2))))
        return attn_call(self, x, *args, **kw)

    def mlp(self, x, *args, **kw):
        seen["mlp"].append(float(jnp.sqrt(jnp.mean(x**2))))
        return mlp_call(self, x, *args, **kw)

    monkeypatch.setattr(Attention, "__call__", attn)
    monkeypatch.setattr(MLP, "__call__", mlp)
    return seen


def test_lns_norm_outputs_are_scaled_by_inverse_sqrt_depth(monkeypatch):
    seen = _record_sublayer_input_rms(monkeypatch)
    toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 61)
    rms = {}
    for scheme in ("pre", "lns"):
        # A tiny eps: the residual stream starts at RMS 0.02, where eps=1e-6 shifts a norm's output by 0.1%.
        # Unrolled and without remat (whose checkpoint traces the layer), so the recorder sees values.
        m = dataclasses.replace(M, num_layers=6, norm=scheme, scan_layers=False, norm_eps=1e-12, remat="none")
        Transformer(m, nnx.Rngs(0))(toks)
        rms[scheme] = {k: np.array(v) for k, v in seen.items()}
        seen["attn"].clear(), seen["mlp"].clear()
    for sublayer in ("attn", "mlp"):
        np.testing.assert_allclose(rms["pre"][sublayer], 1.0, rtol=1e-4)  # unit gains at init
        np.testing.assert_allclose(rms["lns"][sublayer] / rms["pre"][sublayer], 1 / np.sqrt(np.arange(1, 7)),
                                   rtol=1e-4)


def test_embed_norm_normalises_the_first_layer_input():
    m = dataclasses.replace(M, norm="peri", embed_norm=True, norm_eps=1e-12)  # embeddings have RMS ~0.02
    model = Transformer(m, nnx.Rngs(0))
    _, _, hidden = model.forward(jax.random.randint(jax.random.key(0), (2, 16), 0, 61), probe="hidden")
    assert hidden.shape == (5, 2, 16, 32)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(hidden[0] ** 2, -1)), 1.0, rtol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES + ["mix"])
def test_every_scheme_trains_a_step_under_jit(scheme):
    m = dataclasses.replace(M, norm=scheme, canon="AC")
    graph, params = nnx.split(Transformer(m, nnx.Rngs(0)), nnx.Param)
    toks = jax.random.randint(jax.random.key(0), (2, 12), 0, 61)
    targets = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)

    def loss(p):
        logits, _ = nnx.merge(graph, p)(toks)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value)) and abs(float(value) - math.log(61)) < 0.5
    assert np.isfinite(float(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
