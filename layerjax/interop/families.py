"""The Hugging Face families layerjax reads and writes: config translation both ways, and each
family's tensor names (`layerjax.interop.mapping.Rule`s).

Every family is a set of layerjax config fields, never a model class: Llama, Mistral and Qwen are
Pre-LN, Gemma-2 is Peri-LN (sandwich) with (1+w) norms and softcaps, OLMo-2 is the reordered
placement with full-width QK-norm, GPT-2 is Pre-LN LayerNorm with learned positions. Export runs
the translation forward and back and refuses any model field that would not survive the trip, so
nothing is ever dropped silently.
"""

from __future__ import annotations

import dataclasses

from layerjax.config import ModelConfig, d_ff, head_dim, kv_heads
from layerjax.interop.mapping import Rule

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "olmo2", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
# What each norm scheme exports as (for error messages).
EXPORTABLE_SCHEMES = "pre (llama, mistral, qwen2, qwen3, gpt2), peri (gemma2), reordered (olmo2)"
ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """A Hugging Face config (or a layerjax model, for export) that no supported family represents."""


# ---------------------------------------------------------------- Hugging Face config -> fields


def _require(hf: dict, key: str, allowed, family: str, default=None):
    value = hf.get(key, default)
    if value not in allowed:
        raise UnsupportedModelError(
            f"{family}: config.json has {key}={value!r}; layerjax supports {key} in {list(allowed)}")
    return value


def _rope_fields(hf: dict, family: str) -> dict:
    """rope_parameters (transformers >= 5) or rope_theta + rope_scaling (earlier versions)."""
    scaling = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{family}: rope type {rope_type!r} is not supported; layerjax supports {list(ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{family}: partial_rotary_factor != 1 is not part of the {family} architecture")
    fields = {"rope_theta": float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type == "linear":
        fields.update(rope_scaling="linear", rope_factor=float(scaling["factor"]))
    elif rope_type == "llama3":
        fields.update(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                      rope_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_high_freq_factor=float(scaling["high_freq_factor"]),
                      rope_original_max_len=int(scaling["original_max_position_embeddings"]))
    return fields


def _shortest_cycle(pattern: list[str]) -> tuple[str, ...]:
    for period in range(1, len(pattern) + 1):
        if all(pattern[i] == pattern[i % period] for i in range(len(pattern))):
            return tuple(pattern[:period])
    return tuple(pattern)


def _window_fields(hf: dict, family: str) -> dict:
    """sliding_window + which layers use it (layer_types, or the family's fixed pattern)."""
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return {}
    types = hf.get("layer_types")
    if types:
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise UnsupportedModelError(f"{family}: layer_types has {unknown}; supported: sliding_attention, full_attention")
        pattern = ["local" if t == "sliding_attention" else "global" for t in types]
    elif family == "gemma2":  # before layer_types existed: even layers slide, odd layers are global
        pattern = ["local", "global"]
    else:
        pattern = ["local"]
    if "local" not in pattern:
        return {}
    cycle = _shortest_cycle(pattern)
    return {"sliding_window": int(window), "window_pattern": () if cycle == ("local",) else cycle}


def _decoder_fields(hf: dict, family: str) -> dict:
    """Fields every Llama-shaped decoder shares (everything but GPT-2)."""
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{family}: mlp_bias=true is not supported (MLP projections without biases only)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{family}: use_bidirectional_attention is not supported (causal decoders only)")
    return dict(
        vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], d_model=d, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d // heads,
        d_ff=hf["intermediate_size"], max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma2")),
        init_std=float(hf.get("initializer_range", 0.02)), positions="rope", norm_type="rms", mlp="swiglu",
        norm="pre", final_norm=True, use_bias=False,
        bias_projections=("q", "k", "v", "o") if hf.get("attention_bias") else (),
        **_rope_fields(hf, family), **_window_fields(hf, family))


def model_fields(hf: dict) -> dict:
    """A Hugging Face config.json (as a dict) -> layerjax `model.*` fields. Raises
    UnsupportedModelError, before any weight is read, for anything layerjax cannot reproduce."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {family!r} is not supported; layerjax imports {list(FAMILIES)}")
    if family == "gpt2":
        return _gpt2_fields(hf)
    fields = _decoder_fields(hf, family)
    if family in ("llama", "mistral", "qwen2", "qwen3", "olmo2"):
        _require(hf, "hidden_act", ("silu",), family, "silu")
    if family == "qwen2":  # Qwen2 always has q, k, v biases and no output bias
        fields["bias_projections"] = ("q", "k", "v")
    if family == "qwen3":
        fields.update(qk_norm=True, qk_norm_scope="head")
    if family == "olmo2":
        fields.update(norm="reordered", qk_norm=True, qk_norm_scope="full")
    if family == "gemma2":
        _require(hf, "hidden_activation", ("gelu_pytorch_tanh",), family, "gelu_pytorch_tanh")
        if fields["bias_projections"]:
            raise UnsupportedModelError("gemma2: attention_bias=true is not supported")
        fields.update(norm="peri", mlp="geglu", norm_offset=True, embed_scale=True,
                      attn_scale=float(hf.get("query_pre_attn_scalar", fields["head_dim"])) ** -0.5,
                      attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                      final_softcap=float(hf.get("final_logit_softcapping") or 0.0))
    return fields


def _gpt2_fields(hf: dict) -> dict:
    _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gpt2", "gelu_new")
    _require(hf, "scale_attn_weights", (True,), "gpt2", True)
    _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "gpt2", False)
    _require(hf, "add_cross_attention", (False,), "gpt2", False)
    d, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    return dict(
        vocab_size=hf["vocab_size"], num_layers=hf.get("n_layer", 12), d_model=d, num_heads=heads,
        num_kv_heads=heads, head_dim=d // heads, d_ff=hf.get("n_inner") or 4 * d,
        max_seq_len=int(hf.get("n_positions", 1024)), positions="learned", norm_type="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), use_bias=True, mlp="gelu", norm="pre",
        final_norm=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=float(hf.get("initializer_range", 0.02)))


# ---------------------------------------------------------------- layerjax model -> Hugging Face config


def export_family(m: ModelConfig, preferred: str | None = None) -> str:
    """The family a model exports as (`preferred`, e.g. the family it was imported from, when it
    represents the model); raises naming the first field no family can represent."""
    if m.adapter.kind in ("mola", "mole"):
        raise UnsupportedModelError(
            f"model.adapter.kind={m.adapter.kind!r}: a mixture of LoRA experts routes by input, so it cannot be "
            "merged into one weight per projection, and no Hugging Face family has routed experts")
    if m.adapter.kind == "lora":  # tools/export_hf.py merges them first
        raise UnsupportedModelError("model.adapter.kind='lora': merge the adapters into the base first "
                                    "(layerjax.model.merge.merge_lora)")
    if m.recursion.blocks:
        raise UnsupportedModelError(
            f"model.recursion.blocks={m.recursion.blocks}: shared (recursive) blocks have no Hugging Face family; "
            "every exported layer would need its own weights")
    if m.layer_norms:
        raise UnsupportedModelError(
            f"model.layer_norms={list(m.layer_norms)} (per-layer norm schemes) has no Hugging Face equivalent")
    if m.canon:
        raise UnsupportedModelError(f"model.canon={m.canon!r}: canon layers have no Hugging Face equivalent")
    if m.embed_norm:
        raise UnsupportedModelError("model.embed_norm=true: no supported Hugging Face family has an embedding norm")
    if m.norm == "peri":
        family = "gemma2"
    elif m.norm == "reordered":
        family = "olmo2"
    elif m.norm == "pre":
        if m.positions == "learned":
            family = "gpt2"
        elif m.qk_norm:
            family = "qwen3"
        elif set(m.bias_projections) == {"q", "k", "v"}:
            family = "qwen2"
        else:
            family = "mistral" if m.sliding_window else "llama"
    else:
        raise UnsupportedModelError(
            f"model.norm={m.norm!r} has no Hugging Face equivalent; exportable schemes: {EXPORTABLE_SCHEMES}")
    if preferred in FAMILIES and preferred != family:
        try:
            check_round_trip(m, preferred)
            return preferred
        except UnsupportedModelError:
            pass
    check_round_trip(m, family)
    return family


def _rope_config(m: ModelConfig) -> dict:
    rope = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
    if m.rope_scaling == "linear":
        rope["factor"] = m.rope_factor
    elif m.rope_scaling == "llama3":
        rope.update(factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
                    high_freq_factor=m.rope_high_freq_factor, original_max_position_embeddings=m.rope_original_max_len)
    return rope


def _layer_types(m: ModelConfig) -> list[str]:
    pattern = m.window_pattern or ("local",)
    return ["sliding_attention" if pattern[i % len(pattern)] == "local" else "full_attention"
            for i in range(m.num_layers)]


def hf_config(m: ModelConfig, family: str) -> dict:
    """The config.json of `family` for model m (check_round_trip says whether it is faithful)."""
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": m.vocab_size,
              "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
              "dtype": m.param_dtype}
    if family == "gpt2":
        return {**common, "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads,
                "n_inner": d_ff(m), "n_positions": m.max_seq_len, "layer_norm_epsilon": m.norm_eps,
                "activation_function": "gelu_new", "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    config = {**common, "hidden_size": m.d_model, "intermediate_size": d_ff(m), "num_hidden_layers": m.num_layers,
              "num_attention_heads": m.num_heads, "num_key_value_heads": kv_heads(m), "head_dim": head_dim(m),
              "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
              "rope_parameters": _rope_config(m)}
    if family in ("llama", "qwen3", "olmo2"):
        config["attention_bias"] = bool(m.bias_projections)
    if family != "gemma2":
        config["hidden_act"] = "silu"
    if family == "mistral":
        config["sliding_window"] = m.sliding_window or None
    if family in ("qwen2", "qwen3"):
        config.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None,
                      max_window_layers=m.num_layers, layer_types=_layer_types(m) if m.sliding_window else
                      ["full_attention"] * m.num_layers)
    if family == "gemma2":
        scalar = (m.attn_scale or head_dim(m) ** -0.5) ** -2
        config.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=round(scalar, 6),
                      attn_logit_softcapping=m.attn_softcap or None, final_logit_softcapping=m.final_softcap or None,
                      sliding_window=m.sliding_window or None, attention_bias=False,
                      layer_types=_layer_types(m) if m.sliding_window else ["full_attention"] * m.num_layers)
        if float(config["query_pre_attn_scalar"]).is_integer():
            config["query_pre_attn_scalar"] = int(config["query_pre_attn_scalar"])
    return config


# Fields that change neither the function a model computes nor its weights' layout.
_NOT_STRUCTURAL = {"init_std", "dtype", "param_dtype", "scan_layers", "scan_unroll", "remat", "document_mask", "canon_kernel", "adapter",
                   "canon_residual", "canon_bias", "canon_activation", "canon_trainable", "mix_alpha",
                   "deepnorm_alpha"}


def _structure(m: ModelConfig) -> dict:
    """The fields that define the computed function, with defaults resolved and the fields that a
    setting makes irrelevant dropped (e.g. RoPE factors when RoPE is not scaled)."""
    values = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in _NOT_STRUCTURAL}
    values.update(head_dim=head_dim(m), num_kv_heads=kv_heads(m), d_ff=d_ff(m),
                  bias_projections=tuple(sorted(m.bias_projections)))
    if m.use_bias:  # every projection has a bias anyway
        values["bias_projections"] = ()
    if m.positions != "rope":
        for name in ("rope_theta", "rope_scaling", "rope_fraction"):
            values.pop(name, None)
    else:
        values.pop("max_seq_len")  # only learned positions have a table of this length
    if m.rope_scaling != "llama3":
        for name in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
            values.pop(name, None)
        if m.rope_scaling != "linear":
            values.pop("rope_factor", None)
    if not m.sliding_window:
        values.pop("window_pattern", None)
    if not m.qk_norm:
        values.pop("qk_norm_scope", None)
    if not m.attn_scale:
        values["attn_scale"] = head_dim(m) ** -0.5
    return values


def check_round_trip(m: ModelConfig, family: str) -> None:
    """Raises naming every model field that `family`'s config.json cannot carry."""
    back = dataclasses.replace(ModelConfig(), **model_fields(hf_config(m, family)))
    ours, theirs = _structure(m), _structure(back)
    lost = [f"model.{k}={ours.get(k)!r} (would come back as {theirs.get(k)!r})"
            for k in sorted(set(ours) | set(theirs))
            if ours.get(k) != theirs.get(k) and not _close(ours.get(k), theirs.get(k))]
    if lost:
        raise UnsupportedModelError(f"Hugging Face {family!r} cannot represent: " + "; ".join(lost))


def _close(a, b) -> bool:
    return isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * max(abs(a), abs(b))


# ---------------------------------------------------------------- tensor names


_LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
NORM_NAMES = {
    "gemma2": {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
    # OLMo-2 normalises each sublayer's output: our reordered placement's attn_norm / mlp_norm.
    "olmo2": {"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"},
}


def _decoder_rules(family: str) -> list[Rule]:
    layer = "model.layers.{i}."
    rules = [Rule("model.embed_tokens.weight", ("embed.table",)), Rule("model.norm.weight", ("final_norm.scale",)),
             Rule("lm_head.weight", ("head",), "linear")]
    rules += [Rule(f"{layer}{theirs}.weight", (f"{ours}.scale",))
              for ours, theirs in NORM_NAMES.get(family, _LLAMA_NORMS).items()]
    for p in "qkv":
        rules += [Rule(f"{layer}self_attn.{p}_proj.weight", (f"attn.w{p}",), "linear"),
                  Rule(f"{layer}self_attn.{p}_proj.bias", (f"attn.b{p}",), "flat")]
    rules += [
        Rule(f"{layer}self_attn.o_proj.weight", ("attn.wo",), "linear", in_dims=2),
        Rule(f"{layer}self_attn.o_proj.bias", ("attn.bo",)),
        # per-head QK-norm (Qwen3) is [head_dim] on both sides; full-width (OLMo-2) is flattened
        Rule(f"{layer}self_attn.q_norm.weight", ("attn.q_norm.scale",), "flat"),
        Rule(f"{layer}self_attn.k_norm.weight", ("attn.k_norm.scale",), "flat"),
        Rule(f"{layer}mlp.gate_proj.weight", ("mlp.w_gate",), "linear"),
        Rule(f"{layer}mlp.up_proj.weight", ("mlp.w_up",), "linear"),
        Rule(f"{layer}mlp.down_proj.weight", ("mlp.w_out",), "linear"),
    ]
    return rules


def _gpt2_rules() -> list[Rule]:
    layer = "transformer.h.{i}."
    return [
        Rule("transformer.wte.weight", ("embed.table",)), Rule("transformer.wpe.weight", ("positions.table",)),
        Rule("transformer.ln_f.weight", ("final_norm.scale",)), Rule("transformer.ln_f.bias", ("final_norm.bias",)),
        Rule("lm_head.weight", ("head",), "linear"),
        Rule(f"{layer}ln_1.weight", ("attn_norm.scale",)), Rule(f"{layer}ln_1.bias", ("attn_norm.bias",)),
        # Conv1D keeps [in, out]; c_attn holds q, k and v side by side on its output axis.
        Rule(f"{layer}attn.c_attn.weight", ("attn.wq", "attn.wk", "attn.wv"), "conv1d"),
        Rule(f"{layer}attn.c_attn.bias", ("attn.bq", "attn.bk", "attn.bv"), "flat"),
        Rule(f"{layer}attn.c_proj.weight", ("attn.wo",), "conv1d", in_dims=2),
        Rule(f"{layer}attn.c_proj.bias", ("attn.bo",)),
        Rule(f"{layer}ln_2.weight", ("mlp_norm.scale",)), Rule(f"{layer}ln_2.bias", ("mlp_norm.bias",)),
        Rule(f"{layer}mlp.c_fc.weight", ("mlp.w_in",), "conv1d"), Rule(f"{layer}mlp.c_fc.bias", ("mlp.b_in",)),
        Rule(f"{layer}mlp.c_proj.weight", ("mlp.w_out",), "conv1d"), Rule(f"{layer}mlp.c_proj.bias", ("mlp.b_out",)),
    ]


def tensor_rules(family: str) -> list[Rule]:
    return _gpt2_rules() if family == "gpt2" else _decoder_rules(family)


def canonical_name(name: str, family: str) -> str:
    """Checkpoints saved from the bare model (no LM head) lack the "model." / "transformer." prefix."""
    prefix = "transformer." if family == "gpt2" else "model."
    return name if name.startswith(prefix) or name.startswith("lm_head.") else prefix + name


def is_ignored_buffer(name: str, family: str) -> bool:
    """Non-weight buffers that older checkpoints carry: causal masks and RoPE frequency tables."""
    if family == "gpt2" and (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")):
        return True
    return name.endswith("rotary_emb.inv_freq")
