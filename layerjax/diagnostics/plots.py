"""Per-layer plots, drawn from a run's metrics.jsonl. The drawing helpers take one series per
label, so a single run (`plot_layers`) and an ablation grid (tools/ablate.py) share them."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from layerjax.train.metrics import read_metrics  # noqa: E402


def draw_profiles(ax, series: dict[str, list[float]], ylabel: str, title: str, log: bool = False) -> None:
    """One line per label over the 1-based layer index."""
    for label, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, "o-", label=label, markersize=3)
    ax.set(xlabel="layer", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=7)


def draw_heatmap(ax, matrix: list[list[float]], title: str) -> None:
    """Angular distances between hidden states; index 0 is the embedding output."""
    image = ax.imshow(np.asarray(matrix), cmap="viridis", vmin=0.0, origin="lower")
    ax.set(xlabel="hidden state (0 = embeddings)", ylabel="hidden state", title=title)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="arccos(cos) / pi")


def draw_removal(ax, series: dict[str, list[float]], title: str = "layer removal: loss increase") -> None:
    """Grouped bars: validation loss with layer l skipped minus the full model's, per label."""
    width = 0.8 / max(len(series), 1)
    for i, (label, deltas) in enumerate(series.items()):
        ax.bar(np.arange(1, len(deltas) + 1) + (i - (len(series) - 1) / 2) * width, deltas, width, label=label)
    ax.set(xlabel="layer removed", ylabel="val loss - full-model val loss", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(0, color="gray", linewidth=0.5)
    if len(series) > 1:
        ax.legend(fontsize=7)


def last_layer_records(run_dir: str | pathlib.Path) -> tuple[dict | None, dict | None]:
    """The newest "layers" (training-time) and "eval_layers" records of a run, or None."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None, None
    train, evals = read_metrics(run_dir, "layers"), read_metrics(run_dir, "eval_layers")
    return (train[-1] if train else None), (evals[-1] if evals else None)


def plot_layers(run_dir: str | pathlib.Path) -> pathlib.Path | None:
    """Writes layers.png (gradient-norm and variance profiles, angular-distance heatmap, layer
    removal) from the newest per-layer records; None when the run logged none."""
    run_dir = pathlib.Path(run_dir)
    train, evals = last_layer_records(run_dir)
    panels = (2 if train else 0) + (2 if evals else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    if train:
        step = train["step"]
        draw_profiles(axes.pop(0), {"total": train["grad_norm"], "attention": train["grad_norm_attention"],
                                    "mlp": train["grad_norm_mlp"]}, "gradient norm", f"gradient norm (step {step})")
        draw_profiles(axes.pop(0), {"variance": train["variance"]}, "variance of the residual stream",
                      f"residual-stream variance (step {step})", log=True)
    if evals:
        draw_heatmap(axes.pop(0), evals["angular_distance_matrix"], f"angular distance (step {evals['step']})")
        draw_removal(axes.pop(0), {"": evals["removal_delta"]})
    fig.tight_layout()
    path = run_dir / "layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_usage(run_dir: str | pathlib.Path) -> pathlib.Path | None:
    """experts.png: each layer's expert usage (share of top-k assignments, averaged over the run's
    logged steps) as a layers x experts heatmap (blank where a layer has fewer experts), beside
    the router entropy per layer. None for runs without LoRA experts."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        return None
    rows = read_metrics(run_dir, "router")
    if not rows:
        return None
    layers = len(rows[-1]["expert_usage"])
    width = max(len(u) for row in rows for u in row["expert_usage"])
    usage = np.full((layers, width), np.nan)
    for layer in range(layers):
        per_step = [row["expert_usage"][layer] for row in rows]
        usage[layer, :len(per_step[0])] = np.mean(per_step, axis=0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    image = left.imshow(usage, cmap="magma", vmin=0.0, origin="lower", aspect="auto")
    left.set(xlabel="expert", ylabel="layer (0-based)", title="expert usage (share of assignments)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=left, fraction=0.046)
    entropy = np.mean([row["router_entropy"] for row in rows], axis=0)
    right.plot(entropy, np.arange(layers), "o-")
    right.set(xlabel="router entropy (nats)", ylabel="layer (0-based)", title="routing entropy")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = run_dir / "experts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
