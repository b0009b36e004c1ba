"""The layer plan: the config compiled once into what each layer is.

A plan holds, for every layer, a frozen `LayerSpec` (structure: anything that changes which
parameters exist or which code runs) and per-layer scalars (values that change no structure, such
as the layer index or the sliding-window length, so local and global layers share a segment).
Consecutive layers with equal specs form a `Segment`: one stacked parameter tree run by one scan,
with the scalars as scanned inputs. A plan of two segments compiles two scan bodies whatever the
depth.

With recursion (model.recursion.blocks = K) the depths that share blocks form one shared segment:
its stack holds K unique blocks, `Segment.blocks` says which one each depth runs, and the scan over
its depths takes that block's parameters by index, so compile time does not grow with the number
of loops. Per-depth inputs (scalars, relaxation LoRA, KV caches) stay per depth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from layerjax.config import CHOICES, ConfigError, ModelConfig, layer_experts


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The structure of one layer. Equal specs mean equal parameter shapes and equal code."""

    # Norm placement around each sublayer F (attention, MLP), N a norm:
    #   "pre" x + F(N(x)); "post" N(x + F(x)); "peri" x + N_out(F(N_in(x)));
    #   "reordered" x + N(F(x)); "none" x + F(x).
    norm: str
    canon: str = ""  # canon-layer positions, a subset of "ABCD" in that order
    # Multiplies the init std of the value, attention-output and MLP weights (DeepNorm's beta).
    init_scale: float = 1.0
    experts: int = 0  # LoRA experts on each adapted projection (mola/mole); 0: plain LoRA or none
    # Per-depth relaxation LoRA of a shared block (model.recursion.lora_rank*): ranks on the
    # attention and the MLP projections; 0: none.
    relax_rank: int = 0
    relax_rank_mlp: int = 0


# The window of a layer without one: longer than any sequence, and exact in float32.
NO_WINDOW = 2**30

# Per-layer scalars every plan carries, with the value a layer gets when its scheme does not set it.
SCALAR_DEFAULTS = {
    "norm_scale": 1.0,  # multiplies the Pre-LN norm outputs (LayerNorm scaling: 1/sqrt(l))
    "residual_scale": 1.0,  # multiplies x in Post-LN's N(a*x + F(x)) (DeepNorm's alpha)
    "window": float(NO_WINDOW),  # keys a query sees, itself included (model.sliding_window)
}


def deepnorm_constants(num_layers: int, alpha: float = 0.0) -> tuple[float, float]:
    """DeepNet (Wang et al. 2022), decoder-only: alpha = (2N)^(1/4), beta = (8N)^(-1/4).
    A nonzero `alpha` (model.deepnorm_alpha) replaces the residual multiplier; beta stays."""
    return alpha or (2 * num_layers) ** 0.25, (8 * num_layers) ** -0.25


def scheme_layer(scheme: str, layer: int, num_layers: int, canon: str,
                 deepnorm_alpha: float = 0.0) -> tuple[LayerSpec, dict[str, float]]:
    """What a norm scheme (any of CHOICES["model.norm"] but "mix") means for layer `layer`
    (0-based): its spec and the scalars it sets."""
    if scheme == "lns":  # Pre-LN scaled by 1/sqrt(l), l the 1-based layer index
        return LayerSpec("pre", canon), {"norm_scale": (layer + 1) ** -0.5}
    if scheme == "deepnorm":
        alpha, beta = deepnorm_constants(num_layers, deepnorm_alpha)
        return LayerSpec("post", canon, init_scale=beta), {"residual_scale": alpha}
    return LayerSpec(scheme, canon), {}


def layer_windows(m: ModelConfig) -> list[int]:
    """Each layer's sliding window: model.sliding_window where model.window_pattern (a cycle over
    layers) says "local", NO_WINDOW where it says "global" or when there is no window."""
    pattern = m.window_pattern or ("local",)
    return [m.sliding_window if m.sliding_window and pattern[layer % len(pattern)] == "local" else NO_WINDOW
            for layer in range(m.num_layers)]


def recursion_map(num_layers: int, blocks: int, pattern: str) -> list[int | None]:
    """The unique block each depth runs (0..blocks-1), None for a depth with a layer of its own.
    cycle: l mod K; sequence: floor(l / R), R = depths / K; middle_*: the same over depths
    1..L-2, with the first and the last depth unshared. blocks=0: no sharing."""
    if not blocks:
        return [None] * num_layers
    middle = pattern.startswith("middle")
    shared = num_layers - 2 if middle else num_layers
    repeats = shared // blocks
    order = [i % blocks for i in range(shared)] if pattern.endswith("cycle") else [i // repeats for i in range(shared)]
    return [None, *order, None] if middle else order


@dataclasses.dataclass(frozen=True)
class Segment:
    spec: LayerSpec
    first_layer: int
    num_layers: int  # depths the segment runs
    # A shared segment: the unique block (0..num_blocks-1) each of its depths runs; None: each
    # depth has its own parameters.
    blocks: tuple[int, ...] | None = None

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    @property
    def num_blocks(self) -> int:
        """Parameter copies in the segment's stack: its unique blocks, or one per depth."""
        return self.num_layers if self.blocks is None else max(self.blocks) + 1


@dataclasses.dataclass(frozen=True)
class Plan:
    specs: tuple[LayerSpec, ...]
    segments: tuple[Segment, ...]
    # (name, one value per layer) pairs: sliced per segment and fed to the scan as inputs.
    # Tuples, not arrays, so that a plan is hashable and can sit in a module as static data.
    scalar_items: tuple[tuple[str, tuple[float, ...]], ...]
    schemes: tuple[str, ...] = ()  # the norm scheme each layer came from, for the table

    @property
    def num_layers(self) -> int:
        return len(self.specs)

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(values, np.float32) for name, values in self.scalar_items}

    def segment_scalars(self, segment: Segment) -> dict[str, np.ndarray]:
        stop = segment.first_layer + segment.num_layers
        return {name: values[segment.first_layer:stop] for name, values in self.scalars.items()}

    def table(self) -> str:
        """One row per layer: its spec, its scalars, and the segment that runs it."""
        fields = [f.name for f in dataclasses.fields(LayerSpec)]
        scalars = self.scalars
        header = ["layer", "scheme", *fields, *scalars, "block", "segment"]
        show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        # Windows are token counts (too long for 4 digits); NO_WINDOW reads as "-".
        show_scalar = lambda k, v: ("-" if v >= NO_WINDOW else str(int(v))) if k == "window" else f"{v:.4g}"
        rows = []
        for seg_index, seg in enumerate(self.segments):
            for slot, layer in enumerate(seg.layers):
                spec = self.specs[layer]
                block = "own" if seg.blocks is None else f"shared {seg.blocks[slot]}"
                rows.append([str(layer), self.schemes[layer] if self.schemes else "",
                             *(show(getattr(spec, f)) for f in fields),
                             *(show_scalar(k, scalars[k][layer]) for k in scalars), block,
                             f"{seg_index} (layers {seg.first_layer}-{seg.layers[-1]})"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def layer_schemes(m: ModelConfig) -> list[str]:
    """The norm scheme of each layer: model.norm (Mix-LN expanded) with model.layer_norms on top."""
    if m.norm == "mix":
        num_post = math.floor(m.mix_alpha * m.num_layers)
        schemes = ["post"] * num_post + ["pre"] * (m.num_layers - num_post)
    else:
        schemes = [m.norm] * m.num_layers
    allowed = [s for s in CHOICES["model.norm"] if s != "mix"]
    set_by: dict[int, str] = {}  # layer -> the entry that set it: overlapping entries would silently let the last win
    for entry in m.layer_norms:
        try:
            span, scheme = entry.split(":")
            first, _, last = span.partition("-")
            first, last = int(first), int(last or first)
        except ValueError:
            raise ConfigError(
                f"model.layer_norms entry '{entry}' is not 'first-last:scheme', e.g. '0-2:post'") from None
        if scheme not in allowed:
            raise ConfigError(f"model.layer_norms entry '{entry}': scheme '{scheme}' is not one of {allowed}")
        if not 0 <= first <= last < m.num_layers:
            raise ConfigError(
                f"model.layer_norms entry '{entry}': layers must satisfy 0 <= first <= last < "
                f"model.num_layers={m.num_layers}")
        overlap = [layer for layer in range(first, last + 1) if layer in set_by]
        if overlap:
            raise ConfigError(
                f"model.layer_norms entries '{set_by[overlap[0]]}' and '{entry}' both set layer {overlap[0]}: "
                "give each layer one scheme, e.g. shorten one of the ranges")
        set_by.update(dict.fromkeys(range(first, last + 1), entry))
        schemes[first:last + 1] = [scheme] * (last + 1 - first)
    return schemes


def _spec_difference(a: LayerSpec, b: LayerSpec) -> str:
    return ", ".join(f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
                     for f in dataclasses.fields(LayerSpec) if getattr(a, f.name) != getattr(b, f.name))


def build_plan(m: ModelConfig) -> Plan:
    canon = "".join(sorted(m.canon))
    specs, scalars = [], {"layer_index": [], **{name: [] for name in SCALAR_DEFAULTS}}
    schemes, windows, experts = layer_schemes(m), layer_windows(m), layer_experts(m)
    for layer, scheme in enumerate(schemes):
        spec, values = scheme_layer(scheme, layer, m.num_layers, canon, m.deepnorm_alpha)
        spec = dataclasses.replace(spec, experts=experts[layer])
        values = {"window": windows[layer], **values}
        specs.append(spec)
        scalars["layer_index"].append(float(layer))
        for name, default in SCALAR_DEFAULTS.items():
            scalars[name].append(float(values.get(name, default)))
    r = m.recursion
    block_of = recursion_map(m.num_layers, r.blocks, r.pattern)
    if r.blocks:  # relaxation LoRA lives on the shared depths only
        relax = (r.lora_rank, r.lora_rank if r.lora_rank_mlp < 0 else r.lora_rank_mlp)
        specs = [dataclasses.replace(s, relax_rank=relax[0], relax_rank_mlp=relax[1]) if b is not None else s
                 for s, b in zip(specs, block_of)]
        shared = [layer for layer, b in enumerate(block_of) if b is not None]
        differ = sorted({layer for layer in shared if specs[layer] != specs[shared[0]]})
        if differ:
            raise ConfigError(
                f"model.recursion: depths {shared[0]} and {differ[0]} share blocks but their layers differ "
                f"({_spec_difference(specs[shared[0]], specs[differ[0]])}); per-depth structure (Mix-LN, "
                "model.layer_norms, expert counts) cannot vary over shared depths. Give those layers one "
                "structure, or use a per-layer scalar scheme such as lns")
    segments, first = [], 0
    for layer in range(1, m.num_layers + 1):
        if (layer == m.num_layers or specs[layer] != specs[first]
                or (block_of[layer] is None) != (block_of[first] is None)):
            blocks = None if block_of[first] is None else tuple(block_of[first:layer])
            segments.append(Segment(specs[first], first, layer - first, blocks))
            first = layer
    return Plan(tuple(specs), tuple(segments), tuple((k, tuple(v)) for k, v in scalars.items()), tuple(schemes))
