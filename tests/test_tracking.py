"""What a run shows and records besides metrics.jsonl: plain log lines off a terminal, a profile
of chosen steps, the config in TensorBoard, and every JSONL series in Weights & Biases."""

import io
import sys
import types

import pytest

from conftest import TINY_RUN
from layerjax.config import ConfigError, load_config, profile_range
from layerjax.train.loop import train
from layerjax.train.metrics import read_metrics, scalar_series
from layerjax.train.progress import Progress, plain_line


class FakeWandb(types.ModuleType):
    """Records what layerjax hands to wandb.init and wandb.log."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished += 1


def test_progress_prints_plain_lines_when_stdout_is_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=10, initial=0, bar=True, talk=True, stream=stream)
    assert not progress.use_bar
    progress.update(5)
    progress.log(5, {"loss": 2.5, "lr": 3e-3, "tokens_per_sec": 12345.0, "mfu": 0.041, "step_time": 2.0})
    progress.write("step 5: eval loss=2.4")
    assert stream.getvalue().splitlines() == ["step 5/10 loss 2.5000 lr 3.00e-03 tok/s 12,345 mfu 4.1% eta 0m10s",
                                             "step 5: eval loss=2.4"]
    silent = io.StringIO()
    Progress(10, 0, bar=True, talk=False, stream=silent).log(1, {})  # not process 0: says nothing
    assert silent.getvalue() == ""
    assert plain_line(1, 2, {"loss": 1, "lr": 1, "tokens_per_sec": 1, "mfu": 1}, 7300).endswith("eta 2h01m")


def test_profile_steps_parse_and_refuse():
    assert profile_range(load_config("default", ["train.profile_steps=3-5"]).train) == (3, 5)
    assert profile_range(load_config("default", ["train.profile_steps=4"]).train) == (4, 4)
    assert profile_range(load_config("default").train) is None
    for bad in ("x-y", "5-3", "0-2", "10-99999"):
        with pytest.raises(ConfigError, match="train.profile_steps"):
            load_config("default", [f"train.profile_steps={bad}"])


def test_scalar_series_tags_layers_from_zero():
    assert scalar_series("layers", {"grad_norm": [1.0, 2.0], "heat": [[1.0]], "x": 3, "ok": True}) == {
        "layers/grad_norm/layer_00": 1.0, "layers/grad_norm/layer_01": 2.0, "layers/x": 3}


def test_run_logs_plain_lines_profile_tensorboard_config_and_wandb(tmp_path, capsys, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config("default", [*TINY_RUN, f"train.run_dir={tmp_path}", "train.steps=3", "train.log_every=1",
                                  "train.eval_every=3", "logging.progress=true", "logging.tensorboard=true",
                                  "logging.layer_stats_every=3", "train.profile_steps=2-3",
                                  "logging.wandb_project=layerjax-test"])
    train(cfg)
    out = capsys.readouterr().out
    assert [line.split(" loss ")[0] for line in out.splitlines() if line.startswith("step ") and " eta " in line] \
        == ["step 1/3", "step 2/3", "step 3/3"]
    assert "profile of steps 2-3 written to" in out
    assert list((tmp_path / "profile").rglob("*.xplane.pb")), "no trace written"
    # the TensorBoard run holds the config as text (event files store the string's bytes as they are)
    events = b"".join(f.read_bytes() for f in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"config/text_summary" in events and b"d_model = 32" in events
    # W&B: the resolved config, and every scalar and per-layer series of the JSONL at its step
    assert fake.inits[0]["project"] == "layerjax-test" and fake.inits[0]["config"]["model"]["d_model"] == 32
    assert fake.finished == 1 and fake.inits[0]["id"] == (tmp_path / "wandb_id").read_text()
    assert fake.inits[0]["resume"] == "allow"  # a resumed run continues the same W&B run
    logged = {}
    for step, values in fake.logged:
        logged.setdefault(step, {}).update(values)
    for split in ("train", "eval", "layers"):
        for row in read_metrics(tmp_path, split):
            expected = scalar_series(split, {k: v for k, v in row.items() if k not in ("step", "split")})
            assert expected and expected.items() <= logged[row["step"]].items()
    assert "layers/grad_norm/layer_01" in logged[3]
