"""Tables of an ablation grid: one row per cell group (all axes but the seed), mean ± std over
seeds, divergence counts, and the learning-rate sensitivity of Wortsman et al. (2023)."""

from __future__ import annotations

import csv
import math
import pathlib
import statistics

from layerjax.ablation.grid import SEED_AXIS, Axis, Cell

LR_AXIS = "optim.lr"
METRICS = (("train_loss", "train loss"), ("initial_val_loss", "val loss at step 0"), ("val_loss", "val loss"),
           ("val_perplexity", "val ppl"), ("initial_val_accuracy", "exact match at step 0"),
           ("val_accuracy", "val exact match"))


# Per-run figures reported as a group mean, with their column labels and formats (parameters,
# trainable parameters and checkpoint size only where some run differs from the others:
# fine-tuning and recursion grids).
EXTRAS = ("tokens_per_sec", "params", "trainable_params", "checkpoint_mib")
_EXTRA_COLUMNS = {"tokens_per_sec": ("tokens/s", "{:,.0f}"), "params": ("params", "{:,.0f}"),
                  "trainable_params": ("trainable params", "{:,.0f}"), "checkpoint_mib": ("checkpoint MiB", "{:.2f}")}


def diverged(result: dict) -> bool:
    """Non-finite at some step, or ended with a validation loss above its value at init."""
    if result.get("status") == "diverged":
        return True
    loss, initial = result.get("val_loss", math.nan), result.get("initial_val_loss", math.inf)
    return not math.isfinite(loss) or loss > initial


def group_key(cell: Cell, drop: tuple[str, ...] = (SEED_AXIS,)) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in cell.assignment if k not in drop)


def _groups(cells, results, drop=(SEED_AXIS,)) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for cell, result in zip(cells, results):
        groups.setdefault(group_key(cell, drop), []).append(result)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def reported_metrics(results: list[dict]) -> list[tuple[str, str]]:
    """(summary key, column label) of the metrics the runs have: losses, exact match, and exact
    match per answer bucket (Depo hops k, Mano length, ...)."""
    present = [(k, label) for k, label in METRICS if any(k in r for r in results)]
    buckets = sorted({int(k.removeprefix("val_accuracy_k")) for r in results for k in r
                      if k.startswith("val_accuracy_k")})
    names = {int(b): name for r in results for b, name in r.get("buckets", {}).items()}  # sft task names
    return present + [(f"val_accuracy_k{b}", names.get(b, f"k={b}")) for b in buckets]


def summary_rows(axes: list[Axis], cells: list[Cell], results: list[dict]) -> list[dict]:
    """One dict per group: its axis values, seeds, diverged count, mean/std of each metric over the
    runs that did not diverge, and mean tokens/s."""
    rows = []
    present = reported_metrics(results)
    for key, group in _groups(cells, results).items():
        row = {axis: value for axis, value in key}
        row["runs"] = len(group)
        row["diverged"] = sum(diverged(r) for r in group)
        healthy = [r for r in group if not diverged(r)]
        for metric, _ in present:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r.get(metric, math.nan) for r in healthy])
        for extra in EXTRAS:
            row[extra] = _mean_std([r.get(extra, math.nan) for r in group])[0]
        rows.append(row)
    return rows


def lr_sensitivity(cells: list[Cell], results: list[dict]) -> list[dict]:
    """Wortsman et al.: E_lr[min(loss(lr), loss_0)] - min_lr loss(lr), with loss(lr) the final val
    loss (mean over seeds) and loss_0 the loss at initialization, which also stands in for a
    diverged run. Lower is better: 0 means every lr in the grid reached the best loss."""
    rows = []
    for key, group in _groups(cells, results, drop=(SEED_AXIS, LR_AXIS)).items():
        group_cells = [c for c in cells if group_key(c, (SEED_AXIS, LR_AXIS)) == key]
        initial = _mean_std([r.get("initial_val_loss", math.nan) for r in group])[0]
        by_lr: dict[float, list[float]] = {}
        for cell, result in zip(group_cells, group):
            loss = result.get("val_loss", math.nan)
            by_lr.setdefault(float(cell.value(LR_AXIS)), []).append(loss if not diverged(result) else initial)
        losses = {lr: min(statistics.fmean(v), initial) for lr, v in sorted(by_lr.items())}
        best = min(losses.values())
        rows.append({**dict(key), "lr_sensitivity": statistics.fmean(losses.values()) - best,
                     "best_lr": min(losses, key=losses.get), "best_val_loss": best, "initial_val_loss": initial,
                     "val_loss_by_lr": losses})
    return rows


def _fmt(mean: float, std: float) -> str:
    return "—" if not math.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"


def write_tables(out_dir: pathlib.Path, axes: list[Axis], cells: list[Cell], results: list[dict]) -> dict:
    """Writes results.md and results.csv (and lr_sensitivity.csv when the grid has optim.lr)."""
    rows = summary_rows(axes, cells, results)
    group_axes = [a.key for a in axes if a.key != SEED_AXIS]
    metrics = reported_metrics(results)
    extras = ["tokens_per_sec"] + [e for e in EXTRAS[1:]
                                   if len({r.get(e) for r in results if math.isfinite(r.get(e, math.nan))}) > 1]
    header = [*(k.rsplit(".", 1)[-1] for k in group_axes), "runs", "diverged",
              *(label for _, label in metrics), *(_EXTRA_COLUMNS[e][0] for e in extras)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells_md = [row[k] for k in group_axes] + [str(row["runs"]), str(row["diverged"])]
        cells_md += [_fmt(row[f"{k}_mean"], row[f"{k}_std"]) for k, _ in metrics]
        cells_md += ["—" if not math.isfinite(row[e]) else _EXTRA_COLUMNS[e][1].format(row[e]) for e in extras]
        lines.append("| " + " | ".join(cells_md) + " |")
    seeds = next((a.values for a in axes if a.key == SEED_AXIS), ())
    text = [f"# Ablation results\n\nmean ± std over seeds {', '.join(seeds) or '(one run)'}; a run counts as "
            "diverged if a step went non-finite or its final val loss is above its loss at init "
            "(diverged runs are left out of the means).\n", *lines]
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = {"rows": rows}
    if any(a.key == LR_AXIS for a in axes):
        sens = lr_sensitivity(cells, results)
        report["lr_sensitivity"] = sens
        other = [k for k in group_axes if k != LR_AXIS]
        text += ["\n## Learning-rate sensitivity (Wortsman et al. 2023)\n",
                 "| " + " | ".join([*(k.rsplit('.', 1)[-1] for k in other), "lr sensitivity", "best lr",
                                     "best val loss", "val loss at init"]) + " |",
                 "|" + "---|" * (len(other) + 4)]
        for row in sens:
            text.append("| " + " | ".join([*(row[k] for k in other), f"{row['lr_sensitivity']:.3f}",
                                           f"{row['best_lr']:g}", f"{row['best_val_loss']:.3f}",
                                           f"{row['initial_val_loss']:.3f}"]) + " |")
        with open(out_dir / "lr_sensitivity.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in sens[0] if k != "val_loss_by_lr"])
            writer.writeheader()
            writer.writerows([{k: v for k, v in r.items() if k != "val_loss_by_lr"} for r in sens])
    (out_dir / "results.md").write_text("\n".join(text) + "\n")
    return report
