"""Tiny random Hugging Face models, built locally with transformers + PyTorch (never downloaded).

Every family gets a config that exercises what layerjax must reproduce: RoPE scaling (Llama:
llama3, Qwen3: linear), sliding windows shorter than the test sequence (Mistral, Gemma-2), softcaps
that bite (Gemma-2), an explicit head_dim that is not d_model / heads (Qwen3, Gemma-2), tied and
untied heads. Weights are redrawn with a larger spread than HF's init so that logits are far from
uniform, and norm weights are perturbed so that a swapped norm shows.
"""

from __future__ import annotations

import pathlib

D_MODEL, HEADS, LAYERS, VOCAB, FFN = 64, 4, 2, 128, 96


def family_config(family: str, kv_heads: int):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=8, head_dim=D_MODEL // HEADS, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if family == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=12, sliding_window=8,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "olmo2":
        return transformers.Olmo2Config(**common, tie_word_embeddings=False)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def make_hf_model(family: str, kv_heads: int, seed: int = 0):
    """A float32, eval-mode transformers model with spread-out random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = family_config(family, kv_heads)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                base = 0.0 if family == "gemma2" else 1.0  # Gemma norms compute x * (1 + w)
                param.copy_(base + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def save_hf_model(family: str, kv_heads: int, directory: pathlib.Path, seed: int = 0):
    model = make_hf_model(family, kv_heads, seed)
    model.save_pretrained(directory)
    return model
