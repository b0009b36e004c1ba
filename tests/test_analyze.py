"""tools/analyze.py: the analysis of a checkpoint reproduces the training loop's eval at that step,
writes its per-layer diagnostics and PNGs beside the run without touching anything of the run's,
fails in one line, works on an imported Hugging Face model; and every plot numbers layers from 0
as the plan table, model.layer_norms and the metrics do."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import pathlib
import shutil
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from layerjax.config import load_config
from layerjax.diagnostics.plots import LAYER_AXIS, draw_heatmap, draw_profiles, draw_removal, hidden_state_ticks
from layerjax.train.metrics import read_metrics

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
analyze_tool = importlib.import_module("analyze")

NUM_LAYERS = 2  # TINY_RUN's


@pytest.fixture(scope="module")
def run(checkpointed_run, tmp_path_factory) -> pathlib.Path:
    """A copy of the shared 6-step tiny Depo run (conftest), with an eval and a checkpoint at
    steps 2, 4 and 6: the analysis folder goes into the copy."""
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    shutil.copytree(checkpointed_run, run_dir)
    return run_dir


def snapshot(run_dir: pathlib.Path) -> dict[str, str]:
    """Every path of the run outside analysis/, with the hash of each file's bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(run_dir.rglob("*")) if p.relative_to(run_dir).parts[0] != "analysis"}


def test_analysis_reproduces_the_training_eval_and_leaves_the_run_untouched(run, capsys):
    before = snapshot(run)
    result = analyze_tool.main([str(run), "--layer-stats", "--layer-eval", "--no-progress"])
    out_dir = run / "analysis" / "step_6"
    assert result["step"] == 6 and pathlib.Path(result["out_dir"]) == out_dir.resolve()

    trained = {row["step"]: row for row in read_metrics(run, "eval")}
    expected = {k: v for k, v in trained[6].items() if k not in ("step", "split")}
    assert set(result["eval"]) == set(expected) >= {"loss", "perplexity", "accuracy", "accuracy_k1", "accuracy_k2"}
    for key, value in expected.items():
        assert result["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert result["chance_accuracy"] == pytest.approx(json.loads((run / "summary.json").read_text())["chance_accuracy"])

    # Per-layer series, one value per layer (0-based, as in metrics.jsonl); layer removal's
    # full-model loss is the eval loss computed the other way.
    assert all(len(v) == NUM_LAYERS for v in result["layers"].values())
    assert {"grad_norm", "grad_norm_attention", "grad_norm_mlp", "rms", "variance", "max_abs",
            "angular_distance"} == set(result["layers"])
    layers = result["eval_layers"]
    assert len(layers["removal_delta"]) == NUM_LAYERS
    assert np.shape(layers["angular_distance_matrix"]) == (NUM_LAYERS + 1, NUM_LAYERS + 1)
    assert layers["full_loss"] == pytest.approx(result["eval"]["loss"], rel=1e-5)

    assert json.loads((out_dir / "analysis.json").read_text()) == result
    assert (out_dir / "layers.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "at step 6" in printed and "accuracy_k2" in printed
    table = printed[printed.index("layer  grad_norm"):].splitlines()
    assert [row.split()[0] for row in table[1:NUM_LAYERS + 1]] == ["0", "1"]

    # An older checkpoint, eval only, into a folder of the user's choosing.
    elsewhere = run.parent / "elsewhere"
    older = analyze_tool.main([str(run), "--step", "2", "--out", str(elsewhere), "--no-progress"])
    assert older["eval"]["loss"] == pytest.approx(trained[2]["loss"], rel=1e-5)
    assert "layers" not in older and not (elsewhere / "layers.png").exists() and (elsewhere / "analysis.json").exists()

    assert snapshot(run) == before  # checkpoints, metrics.jsonl, summary, plots: byte for byte


def test_errors_are_one_line(run, tmp_path, capsys):
    def error(*args) -> str:
        with pytest.raises(SystemExit) as exit_info:
            analyze_tool.main([*args, "--no-progress"])
        message = str(exit_info.value.code)
        assert message.startswith("analyze: ") and "\n" not in message
        return message

    assert "steps [2, 4, 6]" in error(str(run), "--step", "3")
    assert "no such run directory" in error(str(tmp_path / "missing"))
    assert "data.* overrides only" in error(str(run), "--data", "model.num_layers=3")
    assert "did you mean 'data.source'" in error(str(run), "--data", "data.sourc=text")
    assert "write over the run's own files" in error(str(run), "--out", str(run))
    assert "write over the run's own files" in error(str(run), "--out", str(run / "checkpoints" / "x"))


def test_plots_number_layers_from_zero():
    fig, (profile, heatmap, removal) = plt.subplots(1, 3)
    draw_profiles(profile, {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}, "y", "t")
    assert [list(line.get_xdata()) for line in profile.lines] == [[0, 1, 2]] * 2
    draw_removal(removal, {"": [0.1, 0.2, 0.3]})
    assert [bar.get_x() + bar.get_width() / 2 for bar in removal.patches] == pytest.approx([0, 1, 2])
    assert profile.get_xlabel() == LAYER_AXIS == "layer (0-based)" and removal.get_xlabel().startswith(LAYER_AXIS)

    # The heatmap of 3 layers has 4 hidden states: the embeddings, then layers 0..2's outputs.
    draw_heatmap(heatmap, np.zeros((4, 4)).tolist(), "t")
    assert list(heatmap.get_xticks()) == [0, 1, 2, 3]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["emb", "0", "1", "2"]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["emb", "0", "1", "2"]
    plt.close(fig)

    # Deep models label every k-th state, still under the layer's own index.
    positions, labels = hidden_state_ticks(33)
    assert len(positions) <= 12 and labels[0] == "emb"
    assert all(label == str(p - 1) for p, label in zip(positions[1:], labels[1:]))


def test_imported_hugging_face_model_is_analysed_on_given_text(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from hf_models import save_hf_model
    from test_interop import write_tokenizer

    from layerjax.data.pipeline import build_data
    from layerjax.interop import import_hf

    hf_model = save_hf_model("llama", 2, tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    run = tmp_path / "run"
    import_hf(tmp_path / "hf", run, progress=False)
    corpus = tmp_path / "corpus.txt"
    words = "the a to of and in is it that was for on with as by".split()
    corpus.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(40)))
    data = [f"data.paths={corpus}", "data.seq_len=32", "data.batch_size=4", "data.num_eval_batches=2"]

    before = snapshot(run)
    result = analyze_tool.main([str(run), "--data", *data, "--layer-eval", "--no-progress"])
    assert result["step"] == 0 and (run / "analysis" / "step_0" / "layers.png").exists()
    assert "accuracy" not in result["eval"]  # plain text has no answers to match
    assert snapshot(run) == before

    # The same eval batches through transformers: each packed document on its own.
    cfg = load_config(str(run / "config.toml"), data)
    ce_sum, weight = 0.0, 0.0
    for batch in build_data(cfg).eval_batches():
        for row in range(len(batch["inputs"])):
            for segment in set(batch["segment_ids"][row].tolist()) - {0}:
                where = batch["segment_ids"][row] == segment
                with torch.no_grad():
                    logits = hf_model(torch.from_numpy(batch["inputs"][row][where][None]).long()).logits[0]
                ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["targets"][row][where]).long(),
                                                       reduction="none").numpy()
                ce_sum += float(np.sum(ce * batch["weights"][row][where]))
                weight += float(np.sum(batch["weights"][row][where]))
    assert result["eval"]["loss"] == pytest.approx(ce_sum / weight, rel=1e-4)
    assert result["eval"]["perplexity"] == pytest.approx(math.exp(ce_sum / weight), rel=1e-4)
