"""A grid of config overrides, expanded into cells; each cell is an ordinary training run in its
own run dir under `<out>/cells/`, so an interrupted cell resumes from its checkpoint and a
finished one (summary.json, or a recorded divergence) is skipped when the grid runs again."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
import re
import time
from typing import Sequence

from layerjax.config import Config, ConfigError, load_config, to_toml

SEED_AXIS = "seed"  # shorthand: sets train.seed (init) and data.seed (data order) together
VARIANT_AXIS = "variant"  # named bundles of overrides (--variant NAME="key=v key=v"), one axis
RUN_DIR_KEY = "train.run_dir"  # set by the grid for every cell: <out>/cells/<name>


@dataclasses.dataclass(frozen=True)
class Axis:
    key: str  # a dotted config key, or "seed"
    values: tuple[str, ...]

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Cell:
    assignment: tuple[tuple[str, str], ...]  # (axis key, value) in axis order
    name: str  # directory name, e.g. "norm=pre__seed=0"
    config: Config

    def value(self, key: str) -> str | None:
        return dict(self.assignment).get(key)


def parse_axes(specs: Sequence[str]) -> list[Axis]:
    """["model.norm=pre,post", "seed=0,1"] -> axes, rejecting malformed or repeated keys."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        values = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not key.strip() or not values:
            raise ConfigError(f"--grid '{spec}' is not key=value1,value2,..., e.g. model.norm=pre,post")
        if key.strip() == VARIANT_AXIS:
            raise ConfigError("the variant axis is given by --variant NAME=\"key=v key=v\", once per value")
        if any(a.key == key.strip() for a in axes):
            raise ConfigError(f"--grid gives '{key}' twice; put all its values in one --grid")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"--grid {key.strip()} lists {repeated} more than once; give each value once "
                              "(use seed=0,1,... for repeated runs)")
        _refuse_run_dir([key.strip()], "--grid")
        axes.append(Axis(key.strip(), values))
    return axes


def parse_variants(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """['lora=model.adapter.kind=lora model.adapter.rank=16', ...] -> {name: overrides}: each
    variant is one value of the "variant" axis and applies all its whitespace-separated overrides,
    for cells that differ in several settings at once (a method and its rank, say)."""
    variants: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        name, overrides = name.strip(), tuple(rest.split())
        if not sep or not name or any(c in name for c in "/ ,") or "=" not in rest:
            raise ConfigError(f"--variant '{spec}' is not NAME=\"key=value key=value ...\", e.g. "
                              "lora16=\"model.adapter.kind=lora model.adapter.rank=16\"")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"--variant {name}: {bad} are not key=value overrides")
        if name in variants:
            raise ConfigError(f"--variant {name} is given twice")
        variants[name] = overrides
    return variants


def _refuse_run_dir(keys: Sequence[str], where: str) -> None:
    """The grid owns every cell's run dir; a train.run_dir from the user would be overridden silently."""
    if RUN_DIR_KEY in (k.strip() for k in keys):
        raise ConfigError(f"{where} sets {RUN_DIR_KEY}, but every cell runs in <out>/cells/<cell name>; "
                          "choose where the grid goes with --out instead")


def cell_dir_name(labels: Sequence[str], values: Sequence[str]) -> str:
    """The cell's directory name, "label=value__label=value": one path component, whatever the
    values hold. Characters other than letters, digits and ._+-=, become "_" (so "/" cannot make
    subdirectories or, with "..", leave <out>/cells), and a long name is cut and made unique by a hash."""
    name = "__".join(f"{label}={value}" for label, value in zip(labels, values)) or "base"
    safe = re.sub(r"[^A-Za-z0-9._+=,-]", "_", name)
    if len(safe) > 120:  # file systems allow 255 bytes per name
        safe = safe[:110] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return safe


def variant_axis(variants: dict[str, tuple[str, ...]]) -> list[Axis]:
    return [Axis(VARIANT_AXIS, tuple(variants))] if variants else []


def _overrides(assignment, variants) -> list[str]:
    out = []
    for key, value in assignment:
        if key == SEED_AXIS:
            out += [f"train.seed={value}", f"data.seed={value}"]
        elif key == VARIANT_AXIS:
            out += list(variants[value])
        else:
            out.append(f"{key}={value}")
    return out


def expand(preset: str, axes: list[Axis], fixed: Sequence[str], out_dir: pathlib.Path,
           variants: dict[str, tuple[str, ...]] | None = None) -> list[Cell]:
    """Every combination of axis values as a validated config (all checked before anything runs).
    The "variant" axis takes its values' overrides from `variants`."""
    variants = variants or {}
    _refuse_run_dir([o.partition("=")[0] for o in fixed], "--set")
    for variant, overrides in variants.items():
        _refuse_run_dir([o.partition("=")[0] for o in overrides], f"--variant {variant}")
    shorts = [a.short for a in axes]
    labels = [a.short if shorts.count(a.short) == 1 else a.key for a in axes]
    cells, names = [], {}
    for values in itertools.product(*(a.values for a in axes)):
        assignment = tuple(zip((a.key for a in axes), values))
        name = cell_dir_name(labels, values)
        if name in names:  # two values that differ only in characters the name replaces
            raise ConfigError(f"grid cells {names[name]} and {list(values)} would share the directory "
                              f"cells/{name}; give values that differ in letters or digits")
        names[name] = list(values)
        overrides = [*fixed, *_overrides(assignment, variants), f"train.run_dir={out_dir / 'cells' / name}"]
        try:
            cfg = load_config(preset, overrides)
        except ConfigError as e:
            raise ConfigError(f"grid cell {name}: {e}") from None
        cells.append(Cell(assignment, name, cfg))
    return cells


def cell_result(cell: Cell) -> dict | None:
    """The finished cell's summary (with "status"), or None if it has not finished."""
    run_dir = pathlib.Path(cell.config.train.run_dir)
    status = run_dir / "cell_status.json"
    if status.exists():
        return json.loads(status.read_text())
    return None


def run_cell(cell: Cell) -> dict:
    """Trains the cell (resuming if it was interrupted) and records how it ended: "finished",
    or "diverged" when a step went non-finite (train.on_nonfinite=stop)."""
    from layerjax.train.loop import NonFiniteError, train

    run_dir = pathlib.Path(cell.config.train.run_dir)
    if not _same_run(cell.config, run_dir / "config.toml"):
        raise ConfigError(f"{run_dir} holds a run with a different config; give the grid a new --out "
                          "or delete that cell's directory")
    try:
        summary = train(cell.config)
        if summary["stopped_by"] != "completed":  # interrupted: leave it resumable, record nothing
            return {**summary, "status": "interrupted"}
        result = {**summary, "status": "finished"}
    except NonFiniteError as e:
        result = {"status": "diverged", "error": str(e), "run_dir": str(run_dir.resolve())}
    result["cell"] = cell.name
    (run_dir / "cell_status.json").write_text(json.dumps(result, indent=2))
    return result


def _same_run(cfg: Config, saved: pathlib.Path) -> bool:
    """Whether a run dir's config.toml is this config (the run resolves model.vocab_size=0)."""
    if not saved.exists():
        return True
    previous = load_config(str(saved))
    if cfg.model.vocab_size == 0:
        previous = dataclasses.replace(previous, model=dataclasses.replace(previous.model, vocab_size=0))
    return to_toml(previous) == to_toml(cfg)


def run_grid(cells: list[Cell], log=print) -> list[dict]:
    """Runs unfinished cells in order, with an overall progress line (done, rate, ETA) per cell."""
    results, durations = [], []
    for index, cell in enumerate(cells, 1):
        done = cell_result(cell)
        if done is not None:
            log(f"[{index}/{len(cells)}] {cell.name}: already {done['status']}, skipped")
            results.append(done)
            continue
        remaining = len(cells) - index + 1
        eta = f", ETA {_minutes(remaining * sum(durations) / len(durations))}" if durations else ""
        log(f"[{index}/{len(cells)}] {cell.name}: running{eta}")
        start = time.perf_counter()
        result = run_cell(cell)
        durations.append(time.perf_counter() - start)
        results.append(result)
        if result["status"] == "interrupted":
            log(f"[{index}/{len(cells)}] {cell.name}: interrupted; run the same command to resume")
            break
        log(f"[{index}/{len(cells)}] {cell.name}: {result['status']} in {_minutes(durations[-1])}")
    return results


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
