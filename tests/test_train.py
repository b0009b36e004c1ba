"""Training invariants: resume == uninterrupted, sharded == single device, microbatched == one
batch, non-finite steps stop or skip, schedules and the weight-decay mask, SIGTERM saves."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import FAST_COMPILE, TINY_RUN
from layerjax.config import load_config
from layerjax.data.pipeline import build_data
from layerjax.cli import EXIT_NONFINITE, train_main
from layerjax.train.loop import train
from layerjax.train.metrics import read_metrics
from layerjax.train.optimizer import decay_mask, lr_schedule
from layerjax.train.state import build_setup, init_state, jit_train_step, resolve_vocab

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=5"]


def tiny_config(tmp_path, *overrides):
    return load_config("default", [*TINY, f"train.run_dir={tmp_path}", *overrides])


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def test_resume_gives_identical_losses(tmp_path):
    full = tiny_config(tmp_path / "full", "train.steps=40", "checkpoint.every=0")
    train(full)
    split = tiny_config(tmp_path / "split", "train.steps=40", "checkpoint.every=0")
    first = train(split, stop_at_step=20)
    assert first["stopped_by"] == "stop_at_step" and first["last_checkpoint"] == 20
    train(split)  # resumes from step 20: params, optimizer, step, RNG and data iterator
    assert len(losses(tmp_path / "split")) == 40
    np.testing.assert_array_equal(losses(tmp_path / "split"), losses(tmp_path / "full"))
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["steps"] == 40 and (tmp_path / "split" / "config.toml").exists()
    assert (tmp_path / "split" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _step_losses(cfg, steps=3):
    data = build_data(cfg)
    cfg = resolve_vocab(cfg, data.vocab_size)
    setup = build_setup(cfg)
    state = init_state(setup, seed=0)
    step = jit_train_step(setup)
    it = data.train_iterator()
    out = []
    for _ in range(steps):
        batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in next(it).items()
                 if k in ("inputs", "targets", "weights", "segment_ids", "positions")}
        state, metrics = step(state, batch)
        out.append(float(metrics["loss"]))
    return out, state


@pytest.mark.parametrize("rules", ["dp", "fsdp"])
def test_sharded_loss_equals_single_device(tmp_path, rules):
    assert jax.device_count() == 8
    single, _ = _step_losses(tiny_config(tmp_path))
    sharded, state = _step_losses(tiny_config(tmp_path, f"mesh.rules={rules}", "mesh.num_devices=8"))
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    wq = state.params["stacks"][0]["blocks"]["attn"]["wq"][...]
    if rules == "fsdp":  # the embed dimension of every weight is split over the 8 devices
        assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
        assert wq.addressable_shards[0].data.shape[1] == 32 // 8
    else:
        assert wq.sharding.is_fully_replicated


def test_microbatches_match_one_batch(tmp_path):
    one, state_one = _step_losses(tiny_config(tmp_path), steps=2)
    four, state_four = _step_losses(tiny_config(tmp_path, "train.microbatches=4"), steps=2)
    np.testing.assert_allclose(four, one, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state_one.params, state_four.params)


@pytest.mark.parametrize("overrides", [
    pytest.param((), id="float32"),
    pytest.param(("model.dtype=bfloat16", "model.param_dtype=bfloat16", "train.microbatches=2"), id="bfloat16")])
def test_a_step_keeps_every_state_type(tmp_path, overrides):
    """The step's output state has the input's shapes and dtypes (traced, not compiled): a type
    that drifts after one step recompiles the step and can double the optimizer's memory. It did
    for bfloat16 parameters, whose gradients and AdamW moments came out float32."""
    cfg = resolve_vocab(tiny_config(tmp_path, *overrides), 64)
    setup = build_setup(cfg)
    state = jax.eval_shape(lambda: init_state(setup, seed=0))
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32), "targets": jax.ShapeDtypeStruct(shape, np.int32),
             "weights": jax.ShapeDtypeStruct(shape, np.float32), "segment_ids": jax.ShapeDtypeStruct(shape, np.int32),
             "positions": jax.ShapeDtypeStruct(shape, np.int32)}
    after, _ = jax.eval_shape(jit_train_step(setup), state, batch)
    types = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
    assert types(after) == types(state)
    if overrides:
        assert {str(x.dtype) for x in jax.tree.leaves(after.opt_state) if x.ndim} == {"bfloat16"}


# An lr of 1e38 keeps the loss and the gradient finite but overflows the update's norm in float32.
HUGE_LR = "optim.lr=1e38"


def test_nonfinite_step_stops_with_one_line_and_exit_code_3(tmp_path, capsys):
    """The message says which value was not finite (here only the update's norm overflows)."""
    with pytest.raises(SystemExit) as stop:
        train_main([*TINY, f"train.run_dir={tmp_path}", "train.steps=5", HUGE_LR, "optim.warmup_steps=0",
                    "checkpoint.every=0"])
    assert stop.value.code == EXIT_NONFINITE == 3
    err = capsys.readouterr().err
    assert re.fullmatch(r"stopped: step 1: the optimizer update is not finite although the loss and the gradient "
                        r"are \(loss=\S+, grad_norm=\S+, update_norm=inf\); no checkpoint was saved yet\. .*\n", err)


def test_nonfinite_step_skipped_when_configured(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=3", HUGE_LR, "optim.warmup_steps=0", "train.on_nonfinite=skip")
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["skipped_updates"] == 3
    _, initial = _step_losses(tiny_config(tmp_path), steps=0)
    from layerjax.train.checkpoint import load_run

    _, _, params, _ = load_run(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, initial.params)  # every update was dropped


def test_schedules():
    base = load_config("default").optim
    sched = lambda **kw: lr_schedule(dataclasses.replace(base, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, **kw), 110)
    cosine = sched(schedule="cosine")
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(110)) == pytest.approx(0.1)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-3)  # halfway down the cosine
    linear = sched(schedule="linear")
    assert float(linear(60)) == pytest.approx(0.55, abs=1e-3)
    assert float(sched(schedule="constant")(100)) == pytest.approx(1.0)
    wsd = sched(schedule="wsd", decay_fraction=0.2)  # 100 post-warmup steps: 80 flat, 20 decaying
    assert float(wsd(89)) == pytest.approx(1.0) and float(wsd(100)) == pytest.approx(0.55, abs=1e-3)
    assert float(wsd(110)) == pytest.approx(0.1)


def test_decay_mask_excludes_norms_biases_embeddings(tmp_path):
    cfg = tiny_config(tmp_path, "model.use_bias=true")
    setup = build_setup(resolve_vocab(cfg, 64))
    flat = dict(jax.tree_util.tree_flatten_with_path(decay_mask(setup.abstract_state.params, ("norm", "bias", "embed")))[0])
    by_name = {"/".join(str(k.key) for k in path if hasattr(k, "key")): v for path, v in flat.items()}
    assert by_name["stacks/0/blocks/attn/wq"] is True
    assert by_name["stacks/0/blocks/mlp/w_out"] is True
    assert by_name["stacks/0/blocks/mlp/b_in"] is False
    assert by_name["stacks/0/blocks/attn_norm/scale"] is False
    assert by_name["stacks/0/blocks/attn/bq"] is False
    assert by_name["final_norm/bias"] is False
    assert by_name["embed/table"] is False
    kept = decay_mask(setup.abstract_state.params, ())
    assert all(jax.tree.leaves(kept))  # nothing excluded: decay everywhere


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"train.run_dir={run_dir}", "train.steps=100000",
           "checkpoint.every=0", "train.log_every=5"]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.2)  # the first logged step: compiled and training
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output  # EX_TEMPFAIL: preempted after saving, requeue
    assert "SIGTERM: saved a checkpoint at step" in output
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["last_checkpoint"] == saved[-1]
    resumed = train(load_config("default", [*TINY, f"train.run_dir={run_dir}", f"train.steps={saved[-1] + 2}"]),
                    allow_config_change=True)
    assert resumed["steps"] == saved[-1] + 2 and resumed["stopped_by"] == "completed"
