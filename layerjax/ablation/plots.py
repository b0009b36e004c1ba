"""PNG plots of an ablation grid, one series per cell group (mean over its seeds)."""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from layerjax.ablation.grid import Cell  # noqa: E402
from layerjax.ablation.report import diverged, group_key  # noqa: E402
from layerjax.diagnostics.plots import draw_heatmap, draw_profiles, draw_removal, last_layer_records  # noqa: E402
from layerjax.train.metrics import read_metrics  # noqa: E402


def label(key: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in key) or "base"


def _by_group(cells: list[Cell]) -> dict[tuple, list[Cell]]:
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    return groups


def _mean_curve(runs: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean and (min, max) spread of `key` over runs, on the steps all runs logged."""
    steps = sorted(set.intersection(*(set(r["step"] for r in run if key in r) for run in runs)))
    values = np.array([[next(r[key] for r in run if r["step"] == s and key in r) for s in steps] for run in runs])
    return np.array(steps), values.mean(0), np.stack([values.min(0), values.max(0)])


def plot_loss_curves(out_dir: pathlib.Path, cells: list[Cell], results: list[dict]) -> pathlib.Path:
    """Mean loss per group over its healthy runs (band: min..max); diverged runs dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    status = {c.name: diverged(r) for c, r in zip(cells, results)}
    for key, group in _by_group(cells).items():
        for ax, split in zip(axes, ("train", "eval")):
            runs = {c.name: read_metrics(c.config.train.run_dir, split) for c in group
                    if (pathlib.Path(c.config.train.run_dir) / "metrics.jsonl").exists()}
            healthy = [r for name, r in runs.items() if r and not status[name]]
            color = None
            if healthy:
                steps, mean, spread = _mean_curve(healthy, "loss")
                line, = ax.plot(steps, mean, "o-" if split == "eval" else "-", markersize=3, label=label(key))
                color = line.get_color()
                if len(healthy) > 1:
                    ax.fill_between(steps, spread[0], spread[1], color=color, alpha=0.15)
            for name, run in runs.items():
                if run and status[name]:
                    line, = ax.plot([r["step"] for r in run], [r["loss"] for r in run], "--", color=color,
                                    linewidth=1, label=None if color else f"{label(key)} (diverged)")
                    color = line.get_color()
    for ax, title in zip(axes, ("train loss", "validation loss")):
        ax.set(xlabel="step", ylabel="loss", title=f"{title} (mean, band = min..max over seeds)")
        ax.legend(fontsize=7)
    return _save(fig, out_dir / "loss_curves.png")


def plot_accuracy(out_dir: pathlib.Path, cells: list[Cell], results: list[dict]) -> pathlib.Path | None:
    """Validation exact match over steps per group (mean over healthy runs), with chance; None
    when the task has no answers."""
    status = {c.name: diverged(r) for c, r in zip(cells, results)}
    chance = next((r["chance_accuracy"] for r in results if r.get("chance_accuracy") is not None), None)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for key, group in _by_group(cells).items():
        runs = [read_metrics(c.config.train.run_dir, "eval") for c in group if not status[c.name]]
        runs = [r for r in runs if r and any("accuracy" in row for row in r)]
        if runs:
            steps, mean, spread = _mean_curve(runs, "accuracy")
            line, = ax.plot(steps, mean, "o-", markersize=3, label=label(key))
            if len(runs) > 1:
                ax.fill_between(steps, spread[0], spread[1], color=line.get_color(), alpha=0.15)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set(xlabel="step", ylabel="exact match", ylim=(0, 1),
           title="validation exact match (mean, band = min..max over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "accuracy.png")


def _mean_records(group: list[Cell]) -> tuple[dict | None, dict | None]:
    """Per-layer records averaged over a group's runs (element-wise, runs that logged them)."""
    records = [last_layer_records(c.config.train.run_dir) for c in group]
    mean = lambda recs: None if not recs else {k: np.mean([r[k] for r in recs], axis=0).tolist()
                                                for k in recs[0] if isinstance(recs[0][k], list)}
    return mean([t for t, _ in records if t]), mean([e for _, e in records if e])


def plot_layer_diagnostics(out_dir: pathlib.Path, cells: list[Cell]) -> list[pathlib.Path]:
    """layer_profiles.png, angular_distance.png and layer_removal.png, from each run's newest
    per-layer records (written when logging.layer_stats_every / logging.layer_eval are on)."""
    groups = {label(k): _mean_records(g) for k, g in _by_group(cells).items()}
    paths = []
    train = {name: t for name, (t, _) in groups.items() if t}
    if train:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        draw_profiles(axes[0], {n: t["grad_norm"] for n, t in train.items()}, "gradient norm",
                      "per-layer gradient norm", log=True)
        draw_profiles(axes[1], {n: t["variance"] for n, t in train.items()}, "variance",
                      "residual-stream variance after each layer", log=True)
        draw_profiles(axes[2], {n: t["angular_distance"] for n, t in train.items()}, "arccos(cos) / pi",
                      "angular distance, layer input to output")
        paths.append(_save(fig, out_dir / "layer_profiles.png"))
    evals = {name: e for name, (_, e) in groups.items() if e}
    if evals:
        cols = min(len(evals), 4)
        rows = math.ceil(len(evals) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.9 * rows), squeeze=False)
        for ax, (name, e) in zip(axes.flat, evals.items()):
            draw_heatmap(ax, e["angular_distance_matrix"], name)
        for ax in list(axes.flat)[len(evals):]:
            ax.axis("off")
        paths.append(_save(fig, out_dir / "angular_distance.png"))
        fig, ax = plt.subplots(figsize=(10, 4))
        draw_removal(ax, {n: e["removal_delta"] for n, e in evals.items()})
        paths.append(_save(fig, out_dir / "layer_removal.png"))
    return paths


def plot_lr_sweep(out_dir: pathlib.Path, sensitivity: list[dict]) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in sensitivity:
        name = label(tuple((k, v) for k, v in row.items() if isinstance(v, str)))
        lrs = sorted(row["val_loss_by_lr"])
        ax.plot(lrs, [row["val_loss_by_lr"][lr] for lr in lrs], "o-",
                label=f"{name} (sensitivity {row['lr_sensitivity']:.3f})")
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final val loss (diverged = loss at init)",
           title="learning-rate sweep")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "lr_sensitivity.png")


def plot_grid(out_dir: pathlib.Path, cells: list[Cell], results: list[dict], report: dict) -> list[pathlib.Path]:
    done = [(c, r) for c, r in zip(cells, results) if r.get("status") in ("finished", "diverged")]
    cells, results = [c for c, _ in done], [r for _, r in done]
    paths = [plot_loss_curves(out_dir, cells, results), plot_accuracy(out_dir, cells, results),
             *plot_layer_diagnostics(out_dir, [c for c, r in done if not diverged(r)])]
    paths = [p for p in paths if p is not None]
    if report.get("lr_sensitivity"):
        paths.append(plot_lr_sweep(out_dir, report["lr_sensitivity"]))
    return paths


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
