"""tools/ablate.py: a grid runs end to end into tables and PNGs, finished cells are skipped, an
interrupted cell resumes from its checkpoint, divergence is recorded, and the learning-rate
sensitivity equals its formula."""

import csv
import json
import math
import pathlib
import sys

import pytest

from conftest import TINY_RUN
from layerjax.ablation import grid as grid_module
from layerjax.ablation.grid import Axis, Cell, expand, parse_axes
from layerjax.ablation.report import diverged, lr_sensitivity
from layerjax.config import ConfigError, load_config
from layerjax.train.loop import train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import ablate  # noqa: E402

FIXED = [*TINY_RUN, "train.steps=6", "train.log_every=2", "train.eval_every=3", "logging.layer_stats_every=3",
         "logging.layer_eval=true", "checkpoint.every=3", "optim.warmup_steps=2"]


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def test_two_scheme_grid_end_to_end_then_skips_finished_cells(tmp_path, capsys):
    args = ["--config", "default", "--grid", "model.norm=pre,post", "--grid", "seed=0", "--out", str(tmp_path),
            *sets(FIXED)]
    # One cell is interrupted at step 3 first (as if killed): the grid must resume it, not restart it.
    cells = expand("default", parse_axes(["model.norm=pre,post", "seed=0"]), FIXED, tmp_path)
    assert [c.name for c in cells] == ["norm=pre__seed=0", "norm=post__seed=0"]
    assert train(cells[1].config, stop_at_step=3)["steps"] == 3
    capsys.readouterr()

    out = ablate.main(args)
    log = capsys.readouterr().out
    assert "resumed from step 3" in log and log.count("new run") == 1
    assert [r["status"] for r in out["results"]] == ["finished", "finished"]
    for name in ("results.md", "results.csv", "loss_curves.png", "accuracy.png", "layer_profiles.png",
                 "angular_distance.png", "layer_removal.png"):
        assert (tmp_path / name).stat().st_size > 1000 or name.endswith((".md", ".csv")), name
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["model.norm"] for r in rows] == ["pre", "post"]
    for row, cell in zip(rows, cells):
        summary = json.loads((pathlib.Path(cell.config.train.run_dir) / "summary.json").read_text())
        assert float(row["val_loss_mean"]) == pytest.approx(summary["val_loss"])
        assert summary["steps"] == 6 and "initial_val_loss" in summary
    table = (tmp_path / "results.md").read_text()
    assert "| pre | 1 | 0 |" in table and "| post | 1 | 0 |" in table

    # Running the same grid again trains nothing and reports the same table.
    before = [(pathlib.Path(c.config.train.run_dir) / "metrics.jsonl").read_text() for c in cells]
    ablate.main(args)
    assert capsys.readouterr().out.count("already finished, skipped") == 2
    assert before == [(pathlib.Path(c.config.train.run_dir) / "metrics.jsonl").read_text() for c in cells]


def test_diverged_cell_is_recorded_and_skipped_next_time(tmp_path, monkeypatch):
    from layerjax.train import loop

    def exploding(cfg):
        raise loop.NonFiniteError("step 2: non-finite loss")

    monkeypatch.setattr(loop, "train", exploding)
    cell = expand("default", [], FIXED, tmp_path)[0]
    pathlib.Path(cell.config.train.run_dir).mkdir(parents=True)
    result = grid_module.run_cell(cell)
    assert result["status"] == "diverged" and diverged(result)
    assert grid_module.cell_result(cell)["status"] == "diverged"


def test_bad_grid_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="key=value1,value2"):
        parse_axes(["model.norm"])
    with pytest.raises(ConfigError, match="twice"):
        parse_axes(["seed=0", "seed=1"])
    with pytest.raises(ConfigError, match="grid cell norm=sandwich: model.norm='sandwich'"):
        expand("default", parse_axes(["model.norm=pre,sandwich"]), [], tmp_path)
    with pytest.raises(SystemExit, match="config error"):
        ablate.main(["--grid", "model.nrom=pre", "--out", str(tmp_path)])
    assert not (tmp_path / "cells").exists()


def test_lr_sensitivity_equals_wortsman_formula():
    cfg = load_config("default")
    cells, results = [], []
    # Scheme A: losses 3.0, 2.5, diverged at the largest lr; scheme B: 2.6, 2.4, 2.8. Init loss 5.
    table = {"a": [3.0, 2.5, None], "b": [2.6, 2.4, 2.8]}
    for norm, losses in table.items():
        for lr, loss in zip(("1e-3", "1e-2", "1e-1"), losses):
            cells.append(Cell((("model.norm", norm), ("optim.lr", lr)), f"{norm}{lr}", cfg))
            results.append({"status": "diverged"} if loss is None else
                           {"status": "finished", "val_loss": loss, "initial_val_loss": 5.0})
    rows = {r["model.norm"]: r for r in lr_sensitivity(cells, results)}
    # E_lr[min(loss, loss_0)] - min loss; the diverged run counts as loss_0 = 5.
    assert rows["a"]["lr_sensitivity"] == pytest.approx((3.0 + 2.5 + 5.0) / 3 - 2.5)
    assert rows["b"]["lr_sensitivity"] == pytest.approx((2.6 + 2.4 + 2.8) / 3 - 2.4)
    assert rows["b"]["best_lr"] == 1e-2 and math.isclose(rows["a"]["best_val_loss"], 2.5)
    assert diverged({"status": "finished", "val_loss": 6.0, "initial_val_loss": 5.0})
    assert not diverged({"status": "finished", "val_loss": 4.0, "initial_val_loss": 5.0})


def test_variants_set_several_keys_per_cell_and_bad_ones_are_refused(tmp_path):
    from layerjax.ablation.grid import parse_variants, variant_axis

    variants = parse_variants(["full=model.adapter.kind=none",
                               "mola=model.adapter.kind=mola model.adapter.experts=2,4 model.adapter.rank=4"])
    axes = variant_axis(variants) + parse_axes(["seed=0,1"])
    cells = expand("default", axes, [], tmp_path, variants)
    assert [c.name for c in cells] == ["variant=full__seed=0", "variant=full__seed=1",
                                       "variant=mola__seed=0", "variant=mola__seed=1"]
    mola = cells[3].config.model.adapter
    assert (mola.kind, mola.experts, mola.rank, cells[3].config.train.seed) == ("mola", ("2", "4"), 4, 1)
    assert cells[0].config.model.adapter.kind == "none"
    for bad, match in ((["lora"], "NAME="), (["a b=model.norm=pre"], "NAME="), (["x=model.norm=pre oops"], "oops"),
                       (["x=model.norm=pre", "x=model.norm=post"], "twice")):
        with pytest.raises(ConfigError, match=match):
            parse_variants(bad)
    with pytest.raises(ConfigError, match="--variant"):
        parse_axes(["variant=a,b"])
    with pytest.raises(ConfigError, match="grid cell variant=bad: .*model.adapter.kind"):
        expand("default", variant_axis(parse_variants(["bad=model.adapter.kind=dora"])), [], tmp_path,
               parse_variants(["bad=model.adapter.kind=dora"]))


def test_report_names_task_columns_and_shows_trainable_params_and_checkpoint_size(tmp_path):
    from layerjax.ablation.report import write_tables

    cfg = load_config("default")
    axes = [Axis("variant", ("full", "lora")), Axis("seed", ("0", "1"))]
    cells, results = [], []
    for variant, trainable, mib in (("full", 1000, 12.0), ("lora", 50, 0.5)):
        for seed, acc in (("0", 0.5), ("1", 0.7)):
            cells.append(Cell((("variant", variant), ("seed", seed)), f"{variant}{seed}", cfg))
            results.append({"status": "finished", "val_loss": 1.0, "initial_val_loss": 5.0, "val_accuracy": acc,
                            "val_accuracy_k1": acc, "val_accuracy_k2": 1 - acc, "buckets": {"1": "depo", "2": "mano"},
                            "tokens_per_sec": 100.0, "trainable_params": trainable, "checkpoint_mib": mib})
    write_tables(tmp_path, axes, cells, results)
    table = (tmp_path / "results.md").read_text()
    assert "| depo | mano | tokens/s | trainable params | checkpoint MiB |" in table
    assert "| lora | 2 | 0 | 5.000 ± 0.000 | 1.000 ± 0.000 | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.400 ± 0.141 | 100 | 50 | 0.50 |" in table
