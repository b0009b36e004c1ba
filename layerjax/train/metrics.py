"""Metric sinks: one JSON object per line in metrics.jsonl (the record every plot and report
reads), TensorBoard event files, and optionally Weights & Biases."""

from __future__ import annotations

import json
import os
import pathlib
import uuid


def scalar_series(split: str, values: dict) -> dict[str, float]:
    """The scalars of one metrics row as tracker tags: numbers as split/name, per-layer lists as
    split/name/layer_NN (0-based, as everywhere); matrices stay in the JSONL only."""
    tags = {}
    for name, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            tags[f"{split}/{name}"] = value
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            tags.update({f"{split}/{name}/layer_{layer:02d}": v for layer, v in enumerate(value)})
    return tags


class MetricsWriter:
    def __init__(self, run_dir: str | pathlib.Path, tensorboard: bool = True, config_toml: str = "",
                 wandb_project: str = "", wandb_entity: str = "", config: dict | None = None):
        run_dir = pathlib.Path(run_dir)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        self._wandb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            if config_toml:  # the TEXT tab shows what produced the curves
                self._tb.add_text("config", "```toml\n" + config_toml + "\n```", 0)
        if wandb_project:
            self._wandb = start_wandb(run_dir, wandb_project, wandb_entity, config or {})

    def write(self, step: int, split: str, values: dict) -> None:
        """split: "train", "eval", "layers", "eval_layers" or "router". Values are numbers, per-layer
        lists (tag split/name/layer_NN) or matrices (JSONL only)."""
        self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        tags = scalar_series(split, values)
        if self._tb is not None:
            for tag, value in tags.items():
                self._tb.add_scalar(tag, value, step)
        if self._wandb is not None and tags:
            self._wandb.log(tags, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_wandb(run_dir: pathlib.Path, project: str, entity: str, config: dict):
    """A W&B run for this run directory; a resumed run continues the same W&B run (its id is kept
    in <run_dir>/wandb_id). WANDB_MODE=offline logs without a network."""
    try:
        import wandb
    except ImportError:
        from layerjax.config import ConfigError

        raise ConfigError("logging.wandb_project is set but wandb is not installed: pip install -e '.[wandb]', "
                          "or set logging.wandb_project=''") from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, entity=entity or None, id=run_id, resume="allow", config=config,
                      name=run_dir.resolve().name, dir=str(run_dir), mode=os.environ.get("WANDB_MODE"))


def read_metrics(run_dir: str | pathlib.Path, split: str = "train") -> list[dict]:
    """The rows of one split; a line cut short by a kill is skipped, and a run without metrics
    has none."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if r.get("split") == split]
