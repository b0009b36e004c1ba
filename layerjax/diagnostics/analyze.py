"""Analysis of a saved checkpoint, without training: the training loop's eval (loss, perplexity,
exact match overall and per bucket) and its per-layer diagnostics, computed on held-out batches
and written to a folder of their own.

Everything is read, nothing under the run is rewritten: the checkpoint is restored read-only, and
metrics.jsonl, the run's layers.png and summary.json are left alone; results go to `out_dir`
(default RUN_DIR/analysis/step_N) as analysis.json and layers.png. The computations are the
loop's own (`evaluate`, `make_layer_stats_step`, `layer_eval`), so an analysis of the step a run
evaluated reproduces that eval.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from tqdm import tqdm

from layerjax.data.pipeline import build_data
from layerjax.diagnostics import layers
from layerjax.diagnostics.plots import plot_layer_records
from layerjax.train.checkpoint import load_run
from layerjax.train.loop import metric_label, evaluate, to_global
from layerjax.train.state import Setup, jit_params_step
from layerjax.train.step import make_eval_step


class AnalysisError(Exception):
    """A request the analysis cannot serve (bad override, no eval data, output over the run)."""


def analyze(run_dir: str | pathlib.Path, step: int | None = None, data_overrides=(), layer_stats: bool = False,
            layer_eval: bool = False, out_dir: str | pathlib.Path | None = None, progress: bool = True) -> dict:
    """Evaluates checkpoint `step` (default: the latest) of `run_dir` on the run's eval data, or on
    the data that `data_overrides` ("data.field=value") describe, optionally with per-layer
    statistics (`layer_stats`) and the angular-distance heatmap and layer removal (`layer_eval`).
    Writes analysis.json (and layers.png when there are per-layer results) into `out_dir` and
    returns what analysis.json holds."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    bad = [o for o in data_overrides if not o.startswith("data.")]
    if bad:  # the model and its numerics are the checkpoint's: only the data may change
        raise AnalysisError(f"--data takes data.* overrides only, not {' '.join(bad)}")
    cfg, setup, params, step = load_run(run_dir, step, list(data_overrides))
    out_dir = pathlib.Path(out_dir) if out_dir is not None else run_dir / "analysis" / f"step_{step}"
    _check_out_dir(out_dir, run_dir)

    data = build_data(cfg)  # one process: load_run put the model on one device
    batches = data.eval_batches()
    if not batches:
        raise AnalysisError(f"no eval batches in {data.summary}; raise data.num_eval_batches or data.val_fraction "
                            "with --data")
    eval_step = jit_params_step(setup, make_eval_step(setup.graphdef))
    result = {"run_dir": str(run_dir.resolve()), "step": step, "data": data.summary,
              "data_overrides": list(data_overrides), "eval_batches": len(batches),
              "eval": evaluate(setup, eval_step, params, batches, data.score)}
    if data.chance_accuracy is not None:
        result["chance_accuracy"] = data.chance_accuracy
    if data.buckets:
        result["buckets"] = {str(k): v for k, v in sorted(data.buckets.items())}

    global_batches = [to_global(b, setup) for b in batches]
    if layer_stats:
        result["layers"] = held_out_layer_stats(setup, params, global_batches, progress)
    if layer_eval:
        result["eval_layers"] = held_out_layer_eval(setup, params, global_batches, progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    with_step = lambda record: record and {"step": step, **record}
    plot = plot_layer_records(with_step(result.get("layers")), with_step(result.get("eval_layers")),
                              out_dir / "layers.png")
    result["out_dir"] = str(out_dir.resolve())
    if plot is not None:
        result["plot"] = str(plot.resolve())
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=2))
    return result


def _check_out_dir(out_dir: pathlib.Path, run_dir: pathlib.Path) -> None:
    """The run's own files (layers.png, summary.json, checkpoints/) are never overwritten."""
    out, run = out_dir.resolve(), run_dir.resolve()
    if out == run or out.is_relative_to(run / "checkpoints"):
        raise AnalysisError(f"--out {out_dir} would write over the run's own files; pick a folder of its own")


# Per-batch statistics are averaged over the held-out batches, except the largest |x|, which is
# the largest over all of them.
_BATCH_REDUCTION = {"max_abs": np.max}


def held_out_layer_stats(setup: Setup, params, global_batches: list, progress: bool = True) -> dict[str, list]:
    """The training loop's per-layer statistics (gradient norms of each layer's parameters,
    residual-stream RMS / variance / max |x| / angular distance), on held-out batches instead of
    a training batch: {name: [num_layers] values}."""
    stats_step = jit_params_step(setup, layers.make_layer_stats_step(setup.graphdef, setup.plan))
    per_batch = [jax.device_get(stats_step(params, batch))
                 for batch in tqdm(global_batches, desc="layer stats", unit="batch", disable=not progress)]
    return {name: np.asarray(_BATCH_REDUCTION.get(name, np.mean)([b[name] for b in per_batch], axis=0),
                             np.float64).tolist()
            for name in per_batch[0]}


def held_out_layer_eval(setup: Setup, params, global_batches: list, progress: bool = True) -> dict:
    """`layer_eval` (angular-distance matrix, removal deltas) with a progress bar over its
    (num_layers + 1) x batches forward passes."""
    hidden_distances, loss_without = layers.make_layer_eval_steps(setup.graphdef)
    num_layers = setup.cfg.model.num_layers
    with tqdm(total=(num_layers + 1) * len(global_batches), desc="layer removal", unit="pass",
              disable=not progress) as bar:
        def counted_loss_without(*args):  # layer_eval calls it once per (layer, batch): the bar counts calls
            bar.update(1)
            return loss_without(*args)

        return layers.layer_eval((hidden_distances, counted_loss_without), params, global_batches, num_layers)


# The per-layer table's columns, in reading order (gradients, then the residual stream, then removal).
TABLE_COLUMNS = ("grad_norm", "grad_norm_attention", "grad_norm_mlp", "rms", "variance", "max_abs",
                 "angular_distance", "removal_delta")


def format_report(result: dict) -> str:
    """The eval numbers as "name value" lines, then one row per layer of the per-layer series."""
    buckets = {int(k): v for k, v in result.get("buckets", {}).items()}
    lines = [f"=== analysis of {result['run_dir']} at step {result['step']} ===",
             f"  {'data':<22} {result['data']}"]
    numbers = {**result["eval"], **({"chance_accuracy": result["chance_accuracy"]} if "chance_accuracy" in result else {})}
    lines += [f"  {metric_label(k, buckets):<22} {v:.6g}" for k, v in numbers.items()]
    per_layer = {**result.get("layers", {}), **result.get("eval_layers", {})}
    series = {k: per_layer[k] for k in TABLE_COLUMNS if k in per_layer}
    if series:
        num_layers = len(next(iter(series.values())))
        rows = [["layer", *series]] + [[str(layer), *(f"{v[layer]:.4g}" for v in series.values())]
                                       for layer in range(num_layers)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["", *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)]
    if "plot" in result:
        lines += ["", f"plots: {result['plot']}"]
    lines.append(f"written to {result['out_dir']}/analysis.json")
    return "\n".join(lines)
