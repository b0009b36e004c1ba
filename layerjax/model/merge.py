"""Folding plain LoRA adapters into their base weights: W' = W + s A B for every adapted projection.

The merged parameters belong to the same model without adapters (`model.adapter.kind=none`), so
they sample at base speed and export to Hugging Face like any model. A mixture of LoRA experts
cannot be merged: its weights depend on the input.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from layerjax.config import ModelConfig

# Adapter target -> (sublayer, base weight) it adds to; "up" is w_in in a non-gated MLP.
_BASE_WEIGHT = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
                "gate": ("mlp", "w_gate"), "up": ("mlp", "w_up"), "down": ("mlp", "w_out")}


def merged_config(m: ModelConfig) -> ModelConfig:
    return dataclasses.replace(m, adapter=dataclasses.replace(m.adapter, kind="none"))


def merge_lora(m: ModelConfig, params: nnx.State) -> nnx.State:
    """params of a plain-LoRA model -> params of `merged_config(m)` (same base, adapters folded)."""
    if m.adapter.kind != "lora":
        raise ValueError(f"model.adapter.kind={m.adapter.kind!r}: only plain LoRA merges into the base weights; "
                         "a mixture of LoRA experts routes by input, so it cannot become one weight")
    tree = params.to_pure_dict()
    scale = m.adapter.alpha / (m.adapter.rank ** 0.5 if m.adapter.rslora else m.adapter.rank)
    for stack in tree["stacks"].values():
        blocks = stack["blocks"]
        for sublayer in ("attn", "mlp"):
            adapters = blocks[sublayer].pop("adapters", {})
            blocks[sublayer].pop("router", None)
            for target, adapter in adapters.items():
                part, name = _BASE_WEIGHT[target]
                if name == "w_up" and "w_up" not in blocks[part]:
                    name = "w_in"
                w = blocks[part][name]
                delta = scale * jnp.einsum("lir,lro->lio", adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32))
                blocks[part][name] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
    abstract = nnx.eval_shape(lambda: _model(merged_config(m)))
    merged = nnx.state(abstract, nnx.Param)
    merged.replace_by_pure_dict(tree)
    return merged


def _model(m: ModelConfig):
    from layerjax.model.transformer import Transformer

    return Transformer(m, nnx.Rngs(0))
