"""The layer plan: the config compiled once into what each layer is.

A plan holds, for every layer, a frozen `LayerSpec` (structure: anything that changes which
parameters exist or which code runs) and per-layer scalars (values that change no structure, such
as the layer index). Consecutive layers with equal specs form a `Segment`: one stacked parameter
tree run by one scan, with the scalars as scanned inputs. A plan of two segments compiles two
scan bodies whatever the depth.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from layerjax.config import CHOICES, ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The structure of one layer. Equal specs mean equal parameter shapes and equal code."""

    norm: str  # norm placement: "pre" x + F(N(x)), "post" N(x + F(x))
    canon: str = ""  # canon-layer positions, a subset of "ABCD" in that order


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
        header = ["layer", *fields, *scalars, "segment"]
        rows = []
        for seg_index, seg in enumerate(self.segments):
            for layer in seg.layers:
                spec = self.specs[layer]
                rows.append([str(layer), *(str(getattr(spec, f)) for f in fields),
                             *(f"{scalars[k][layer]:g}" for k in scalars),
                             f"{seg_index} (layers {seg.first_layer}-{seg.layers[-1]})"])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _layer_norm_overrides(m: ModelConfig) -> dict[int, str]:
    """Parses model.layer_norms entries "first-last:placement" (or "layer:placement")."""
    overrides = {}
    allowed = CHOICES["model.norm"]
    for entry in m.layer_norms:
        try:
            span, placement = entry.split(":")
            first, _, last = span.partition("-")
            first, last = int(first), int(last or first)
        except ValueError:
            raise ConfigError(
                f"model.layer_norms entry '{entry}' is not 'first-last:placement', e.g. '0-2:post'") from None
        if placement not in allowed:
            raise ConfigError(f"model.layer_norms entry '{entry}': placement '{placement}' is not one of {list(allowed)}")
        if not 0 <= first <= last < m.num_layers:
            raise ConfigError(
                f"model.layer_norms entry '{entry}': layers must satisfy 0 <= first <= last < "
                f"model.num_layers={m.num_layers}")
        overrides.update({layer: placement for layer in range(first, last + 1)})
    return overrides


def build_plan(m: ModelConfig) -> Plan:
    overrides = _layer_norm_overrides(m)
    canon = "".join(sorted(m.canon))
    specs = tuple(LayerSpec(norm=overrides.get(layer, m.norm), canon=canon) for layer in range(m.num_layers))
    segments, first = [], 0
    for layer in range(1, m.num_layers + 1):
        if layer == m.num_layers or specs[layer] != specs[first]:
            segments.append(Segment(specs[first], first, layer - first))
            first = layer
    scalars = (("layer_index", tuple(float(i) for i in range(m.num_layers))),)
    return Plan(specs, tuple(segments), scalars)
