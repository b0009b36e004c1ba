"""Name and layout translation between Hugging Face tensors and layerjax parameters.

A `Rule` ties one Hugging Face tensor to one or more layerjax parameters (GPT-2's fused `c_attn`
holds q, k and v) and says how the layouts differ. Per-layer rules name the layer as `{i}` and a
parameter inside a block (`attn.wq`); `bind` turns them into concrete `Binding`s through the plan,
which knows which stacked segment and which slot of its `layers` axis hold layer i. Each
transform is written once, with the array module as a parameter, so NumPy converts weights and
`jax.eval_shape` predicts shapes from the same code.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from layerjax.model.plan import Plan

# Layout kinds, ours -> Hugging Face:
#   "copy":   the same shape (embeddings, norm weights of a matching shape)
#   "flat":   flattened to 1-D (a [heads, head_dim] bias or norm weight)
#   "linear": torch.nn.Linear, [out, in]: ours [*in, *out] is reshaped to [in, out] and transposed
#   "conv1d": GPT-2's Conv1D, [in, out]: ours reshaped to [in, out]
KINDS = ("copy", "flat", "linear", "conv1d")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # Hugging Face name; "{i}" stands for the layer index in per-layer rules
    ours: tuple[str, ...]  # block-relative paths ("attn.wq") in per-layer rules, else model paths
    kind: str = "copy"
    in_dims: int = 1  # leading dims of our array that are the input side (linear, conv1d)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def to_hf(self, arrays: list, xp=jnp):
        """Our arrays -> the Hugging Face tensor (several of ours concatenate on its last axis)."""
        if self.kind == "copy":
            parts = list(arrays)
        elif self.kind == "flat":
            parts = [a.reshape(-1) for a in arrays]
        else:
            parts = [a.reshape(math.prod(a.shape[:self.in_dims]), -1) for a in arrays]
        tensor = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=-1)
        return tensor.T if self.kind == "linear" else tensor

    def to_ours(self, tensor, shapes: list[tuple[int, ...]], xp=np) -> list:
        """The Hugging Face tensor -> our arrays of `shapes`."""
        if self.kind == "linear":
            tensor = tensor.T
        if len(shapes) == 1:
            return [tensor.reshape(shapes[0])]
        widths = [math.prod(s) if self.kind == "flat" else math.prod(s[self.in_dims:]) for s in shapes]
        pieces = xp.split(tensor, np.cumsum(widths)[:-1].tolist(), axis=-1)
        return [p.reshape(s) for p, s in zip(pieces, shapes)]


@dataclasses.dataclass(frozen=True)
class Binding:
    """One Hugging Face tensor and where its parts live: (parameter path, slot or None) each,
    slot being the index on a stacked segment's `layers` axis."""

    hf: str
    rule: Rule
    targets: tuple[tuple[str, int | None], ...]


def path_name(path) -> str:
    """A pytree path of an nnx.State -> "stacks.0.blocks.attn.wq" (the Variable's `.value` dropped)."""
    return ".".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def param_leaves(params) -> dict[str, object]:
    """{dotted path: leaf} of a params tree (arrays or ShapeDtypeStructs)."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def bind(rules: list[Rule], plan: Plan, leaves: dict[str, object]) -> list[Binding]:
    """Concrete bindings for every rule whose parameters exist in `leaves`; raises if a parameter
    of the model is bound by no rule (the family cannot represent it)."""
    bindings, used = [], set()
    for rule in rules:
        if rule.per_layer:
            for s, segment in enumerate(plan.segments):
                for slot, layer in enumerate(segment.layers):
                    paths = [f"stacks.{s}.blocks.{p}" for p in rule.ours]
                    if all(p in leaves for p in paths):
                        bindings.append(Binding(rule.hf.format(i=layer), rule, tuple((p, slot) for p in paths)))
                        used.update(paths)
        elif all(p in leaves for p in rule.ours):
            bindings.append(Binding(rule.hf, rule, tuple((p, None) for p in rule.ours)))
            used.update(rule.ours)
    unbound = sorted(set(leaves) - used)
    if unbound:
        raise ValueError(f"layerjax parameters with no Hugging Face tensor in this family: {unbound}")
    return bindings


def group_bindings(bindings: list[Binding]) -> dict[tuple[str, ...], list[Binding]]:
    """Bindings by the parameters they fill (all layers' `attn.wq` are one group; GPT-2's q, k and
    v are one group together), so a converter can hold one group of weights at a time."""
    groups: dict[tuple[str, ...], list[Binding]] = {}
    for binding in bindings:
        groups.setdefault(tuple(path for path, _ in binding.targets), []).append(binding)
    return groups


def target_shape(leaf, slot: int | None) -> tuple[int, ...]:
    return tuple(leaf.shape[1:]) if slot is not None else tuple(leaf.shape)


def hf_shape(binding: Binding, leaves: dict[str, object]) -> tuple[int, ...]:
    """The shape the Hugging Face tensor must have, derived from our shapes by the rule itself."""
    dummies = [jax.ShapeDtypeStruct(target_shape(leaves[p], slot), jnp.float32) for p, slot in binding.targets]
    return tuple(jax.eval_shape(lambda *a: binding.rule.to_hf(list(a)), *dummies).shape)
