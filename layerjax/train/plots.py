"""PNG plots of a run, drawn from its metrics.jsonl (so they can be redrawn for any run dir)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from layerjax.train.metrics import read_metrics  # noqa: E402


def plot_curves(run_dir: str | pathlib.Path, chance_accuracy: float | None = None) -> pathlib.Path:
    """Writes curves.png: loss (train and eval) and, where the task has one, eval accuracy."""
    run_dir = pathlib.Path(run_dir)
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    accuracy_keys = sorted({k for row in evals for k in row if k.startswith("accuracy")})
    fig, axes = plt.subplots(1, 2 if accuracy_keys else 1, figsize=(11 if accuracy_keys else 6, 4), squeeze=False)
    loss_ax = axes[0, 0]
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    loss_ax.set(xlabel="step", ylabel="loss (weighted tokens)", title="loss")
    loss_ax.legend()
    if accuracy_keys:
        acc_ax = axes[0, 1]
        for key in accuracy_keys:
            rows = [r for r in evals if key in r]
            acc_ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-",
                        label="all" if key == "accuracy" else key.removeprefix("accuracy_"),
                        linewidth=2.5 if key == "accuracy" else 1.0)
        if chance_accuracy is not None:
            acc_ax.axhline(chance_accuracy, color="gray", linestyle="--", label="chance")
        acc_ax.set(xlabel="step", ylabel="exact match", title="validation accuracy", ylim=(0, 1))
        acc_ax.legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
