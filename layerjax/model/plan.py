"""The layer plan: the config compiled once into what each layer is.

A plan holds, for every layer, a frozen `LayerSpec` (structure: anything that changes which
parameters exist or which code runs) and per-layer scalars (values that change no structure, such
as the layer index or the sliding-window length, so local and global layers share a segment).
Consecutive layers with equal specs form a `Segment`: one stacked parameter tree run by one scan,
with the scalars as scanned inputs. A plan of two segments compiles two scan bodies whatever the
depth.
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


@dataclasses.dataclass(frozen=True)
class Segment:
    spec: LayerSpec
    first_layer: int
    num_layers: int

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


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
        header = ["layer", "scheme", *fields, *scalars, "segment"]
        show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
        # Windows are token counts (too long for 4 digits); NO_WINDOW reads as "-".
        show_scalar = lambda k, v: ("-" if v >= NO_WINDOW else str(int(v))) if k == "window" else f"{v:.4g}"
        rows = []
        for seg_index, seg in enumerate(self.segments):
            for layer in seg.layers:
                spec = self.specs[layer]
                rows.append([str(layer), self.schemes[layer] if self.schemes else "",
                             *(show(getattr(spec, f)) for f in fields),
                             *(show_scalar(k, scalars[k][layer]) for k in scalars),
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
        schemes[first:last + 1] = [scheme] * (last + 1 - first)
    return schemes


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
    segments, first = [], 0
    for layer in range(1, m.num_layers + 1):
        if layer == m.num_layers or specs[layer] != specs[first]:
            segments.append(Segment(specs[first], first, layer - first))
            first = layer
    return Plan(tuple(specs), tuple(segments), tuple((k, tuple(v)) for k, v in scalars.items()), tuple(schemes))
