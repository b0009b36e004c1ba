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


LAYER_AXIS = "layer (0-based)"  # the numbering of the plan table, model.layer_norms, TensorBoard and JSONL
MAX_HEATMAP_TICKS = 12  # beyond this, label every k-th hidden state so the labels stay readable


def layer_ticks(num_layers: int) -> np.ndarray:
    """x positions of per-layer values: the layer indices themselves, from 0."""
    return np.arange(num_layers)


def hidden_state_ticks(num_states: int) -> tuple[list[int], list[str]]:
    """Tick positions and labels of the hidden states of a heatmap: "emb" (the embedding output),
    then the output of each layer under that layer's index."""
    stride = -(-num_states // MAX_HEATMAP_TICKS)
    positions = list(range(0, num_states, stride))
    return positions, ["emb" if i == 0 else str(i - 1) for i in positions]


def draw_profiles(ax, series: dict[str, list[float]], ylabel: str, title: str, log: bool = False) -> None:
    """One line per label over the layer index."""
    for label, values in series.items():
        ax.plot(layer_ticks(len(values)), values, "o-", label=label, markersize=3)
    ax.set(xlabel=LAYER_AXIS, ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=7)


def draw_heatmap(ax, matrix: list[list[float]], title: str) -> None:
    """Angular distances between hidden states: the embeddings, then each layer's output."""
    image = ax.imshow(np.asarray(matrix), cmap="viridis", vmin=0.0, origin="lower")
    positions, labels = hidden_state_ticks(len(matrix))
    ax.set_xticks(positions, labels)
    ax.set_yticks(positions, labels)
    ax.set(xlabel=f"output of {LAYER_AXIS}", ylabel=f"output of {LAYER_AXIS}", title=title)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="arccos(cos) / pi")


def draw_removal(ax, series: dict[str, list[float]], title: str = "layer removal: loss increase") -> None:
    """Grouped bars: validation loss with layer l skipped minus the full model's, per label."""
    width = 0.8 / max(len(series), 1)
    for i, (label, deltas) in enumerate(series.items()):
        ax.bar(layer_ticks(len(deltas)) + (i - (len(series) - 1) / 2) * width, deltas, width, label=label)
    ax.set(xlabel=f"{LAYER_AXIS} removed", ylabel="val loss - full-model val loss", title=title)
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
    """Writes the run's layers.png from its newest per-layer records; None when it logged none."""
    run_dir = pathlib.Path(run_dir)
    return plot_layer_records(*last_layer_records(run_dir), run_dir / "layers.png")


def plot_layer_records(train: dict | None, evals: dict | None, path: pathlib.Path) -> pathlib.Path | None:
    """Draws one "layers" record (gradient-norm and variance profiles) and one "eval_layers"
    record (angular-distance heatmap, layer removal), either may be None, into `path`; None when
    both are. Training (metrics.jsonl) and tools/analyze.py (a checkpoint) both draw through it."""
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pathlib.Path(path)


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
