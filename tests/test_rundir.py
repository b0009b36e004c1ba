"""Run directories a researcher can trust: a changed config never damages a run, a finished run is
left alone, a damaged newest checkpoint falls back to the one before, one writer at a time, each
step once in metrics.jsonl, and exit codes a scheduler can act on."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import CHECKPOINTED_RUN
from layerjax.cli import one_line_errors
from layerjax.config import ConfigError, load_config
from layerjax.train.checkpoint import load_run
from layerjax.train.loop import NonFiniteError, SkipCounter, train
from layerjax.train.metrics import read_metrics
from layerjax.train.rundir import LOCK_NAME, RunDirError, RunLock, config_changes, trim_metrics

TINY = CHECKPOINTED_RUN


def tiny_config(run_dir, *overrides):
    return load_config("default", [*TINY, f"train.run_dir={run_dir}", *overrides])


def snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
    """Every file of a run directory (but its lock file) and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def train_rows(run_dir) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(run_dir)]


@pytest.fixture
def finished_run(checkpointed_run) -> pathlib.Path:
    """6 steps, checkpoints at 2, 4 and 6 (conftest); tests copy it before changing anything."""
    return checkpointed_run


def copy_of(run: pathlib.Path, tmp_path) -> pathlib.Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("change", ["model.d_model=64", "model.norm=post", "data.seed=1"])
def test_changed_model_or_data_is_refused_before_anything_is_written(finished_run, tmp_path, change):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"different config; nothing was changed:\n  {key}: .* -> .*\n"
                                          rf"To train a changed model or data, start a new run .*train.init_from"):
        train(tiny_config(run_dir, "train.steps=8", change), allow_config_change=True)
    assert snapshot(run_dir) == before
    load_run(run_dir)  # still samples


def test_changed_schedule_needs_allow_config_change(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"train.steps: 6 -> 8  \(allowed with --allow-config-change\)"):
        train(tiny_config(run_dir, "train.steps=8"))
    assert snapshot(run_dir) == before
    # free settings (logging, cadence, mesh) never block a resume
    assert [c[3] for c in config_changes(load_config("default", TINY),
                                         load_config("default", [*TINY, "train.log_every=7", "mesh.rules=fsdp"]))] \
        == ["free", "free"]


def test_finished_run_is_a_no_op(finished_run, tmp_path, capsys):
    run_dir = copy_of(finished_run, tmp_path)
    before = snapshot(run_dir)
    summary = train(tiny_config(run_dir, "train.steps=6"))
    assert "already finished at step 6" in capsys.readouterr().out
    assert summary == json.loads((run_dir / "summary.json").read_text()) and summary["steps"] == 6
    assert snapshot(run_dir) == before


def test_damaged_newest_checkpoint_falls_back_and_the_losses_continue_identically(finished_run, tmp_path):
    """A run killed mid-way leaves a damaged newest checkpoint, a torn metrics line, an Orbax
    temporary directory and a half-written config; the resume falls back to step 4, writes each
    step once, and its losses equal the uninterrupted run's."""
    run_dir = copy_of(finished_run, tmp_path)
    for f in (run_dir / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")  # truncated array data
    (run_dir / "summary.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tra')
    (run_dir / "checkpoints" / "8.orbax-checkpoint-tmp-1234").mkdir()
    (run_dir / ".config.toml.tmp999").write_text("half")
    with pytest.warns(UserWarning, match=r"checkpoints/6 cannot be read .*kept as 6.unreadable"):
        summary = train(tiny_config(run_dir, "train.steps=6"))
    assert summary["steps"] == 6 and summary["stopped_by"] == "completed"
    assert (run_dir / "checkpoints" / "6.unreadable").is_dir()
    steps = [step for step, _ in train_rows(run_dir)]
    assert steps == [1, 2, 3, 4, 5, 6]  # replayed steps 5 and 6 appear once
    assert train_rows(run_dir) == pytest.approx(train_rows(finished_run), rel=0, abs=0)
    assert summary["val_loss"] == json.loads((finished_run / "summary.json").read_text())["val_loss"]


def test_no_readable_checkpoint_stops_listing_them(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    for step in ("2", "4", "6"):
        shutil.rmtree(run_dir / "checkpoints" / step / "state")
    (run_dir / "summary.json").unlink()
    with warnings.catch_warnings(), pytest.raises(RunDirError, match=r"no readable checkpoint .*step 6: .*step 2: "):
        warnings.simplefilter("ignore")
        train(tiny_config(run_dir, "train.steps=6"))


def test_second_writer_is_refused_and_a_dead_writers_lock_is_not(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        with pytest.raises(RunDirError, match=r"is in use by process \d+ on .*choose another train.run_dir"):
            train(tiny_config(run_dir, "train.steps=1"))
    assert not (run_dir / "config.toml").exists()
    # A lock file left by a killed process holds no lock (the kernel dropped it): the next run takes it.
    (run_dir / LOCK_NAME).write_text("process 999999 on elsewhere (since 2020-01-01T00:00:00)\n")
    with RunLock(run_dir) as lock:
        assert f"process {os.getpid()} on" in lock.path.read_text()
    # ... and a lock held by another process refuses this one
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(run_dir / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match="is in use by"):
            RunLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(run_dir).acquire().release()  # the holder died: free again


def test_trim_metrics_keeps_rows_up_to_the_restored_step(tmp_path):
    rows = [{"step": s, "split": "train", "loss": 1.0} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "sp')
    assert trim_metrics(tmp_path, 2) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert trim_metrics(tmp_path, None) == 2 and read_metrics(tmp_path) == []


def skip_metrics(finite: bool) -> dict:
    return {"finite": np.bool_(finite), "loss": np.float32(2.0), "grad_norm": np.float32(1.0),
            "update_norm": np.float32(1.0 if finite else np.inf)}


def test_too_many_skipped_updates_stop_the_run():
    in_row = SkipCounter(load_config("default", ["train.max_skipped_in_row=2"]), total=0, first_step=0)
    assert [in_row.record(at, skip_metrics(False)) for at in (1, 2)] == [None, None]
    assert in_row.record(2, skip_metrics(False)) is None and in_row.total == 2  # a step counts once
    assert in_row.record(3, skip_metrics(True)) is None and in_row.in_row == 0
    assert [in_row.record(at, skip_metrics(False)) for at in (4, 5)] == [None, None]
    assert in_row.record(6, skip_metrics(False)).startswith(
        "3 updates in a row were dropped as non-finite (train.max_skipped_in_row=2); the last: the optimizer update")
    fraction = SkipCounter(load_config("default", ["train.max_skipped_fraction=0.2"]), total=0, first_step=0)
    problems = [fraction.record(at, skip_metrics(at % 4 == 0)) for at in range(1, 30)]  # 3 of 4 dropped
    assert problems[:20] == [None] * 20  # judged from 20 steps on, at the next drop (step 21)
    assert problems[20].startswith("16 of 21 updates were dropped as non-finite (more than train.max_skipped_fraction=0.2)")


def test_storage_errors_name_the_path_and_the_cause(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop, one_line_errors():
        try:
            open(tmp_path / "missing" / "file")
        except OSError as e:
            raise RuntimeError("wrapped by a library") from e
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == (f"storage error: {tmp_path / 'missing' / 'file'}: No such file or "
                                               "directory (earlier checkpoints are intact)")


def test_preset_data_paths_resolve_next_to_the_preset_not_the_current_directory(tmp_path, monkeypatch):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "corpus.txt").write_text("hello\n")
    (presets / "mine.toml").write_text('extends = "default"\n[data]\nsource = "text"\npaths = ["corpus.txt"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(presets / "mine.toml"))
    assert cfg.data.paths == (str((presets / "corpus.txt").resolve()),)
    # on the command line, relative to the current directory, and saved absolute
    assert load_config("default", ["data.paths=local.txt"]).data.paths == (str(elsewhere / "local.txt"),)
    # the presets in configs/ name repository-relative files
    assert load_config("llama71m").data.paths[0].endswith("shared/data/wikitext2_valid.txt")


def test_saved_config_points_at_the_run_dirs_tokenizer_copy(tmp_path):
    from layerjax.config import to_toml
    from layerjax.train.rundir import relocate_tokenizer

    source = tmp_path / "tok.json"
    source.write_text('{"model": {"type": "WordLevel"}}')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("default", [f"data.tokenizer={source}"])
    (run_dir / "config.toml").write_text(to_toml(relocate_tokenizer(cfg, run_dir)))
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    source.unlink()
    saved = load_config(str(moved / "config.toml"))
    assert saved.data.tokenizer == str((moved / "tokenizer.json").resolve())
    assert pathlib.Path(saved.data.tokenizer).read_text() == '{"model": {"type": "WordLevel"}}'


def test_allowed_change_continues_and_a_nonfinite_stop_names_a_checkpoint_that_restores(finished_run, tmp_path):
    """--allow-config-change continues a finished run under a new schedule (the replaced config is
    kept); here the new lr makes step 7's update overflow, and the stop names step 6's checkpoint."""
    run_dir = copy_of(finished_run, tmp_path)
    cfg = tiny_config(run_dir, "train.steps=8", "optim.lr=1e38", "optim.warmup_steps=0")
    with pytest.raises(NonFiniteError, match=rf"step 7: the optimizer update is not finite .*the last good "
                                             rf"checkpoint is step 6 in {run_dir.resolve() / 'checkpoints'}"):
        train(cfg, allow_config_change=True)
    assert "steps = 6" in (run_dir / "config.before_step6.toml").read_text()
    assert "steps = 8" in (run_dir / "config.toml").read_text()
    _, _, _, step = load_run(run_dir)
    assert step == 6


def test_tensorstore_write_failures_are_storage_errors(capsys):
    """TensorStore reports a full disk as a ValueError carrying the OS error number (as seen on a
    600 KiB tmpfs filled by a save)."""
    from layerjax.cli import StorageExit

    message = ('RESOURCE_EXHAUSTED: Error writing local file "/runs/x/checkpoints/4.orbax-checkpoint-tmp/'
               'state/_sharding": Failed writing: "..." [os_error_code=\'28\']')
    with pytest.raises(StorageExit) as stop, one_line_errors():
        raise ValueError(message)
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == ("storage error: /runs/x/checkpoints/4.orbax-checkpoint-tmp/state/"
                                               "_sharding: No space left on device (earlier checkpoints are intact)")
