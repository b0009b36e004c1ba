"""Metric sinks: one JSON object per line in metrics.jsonl, and TensorBoard event files."""

from __future__ import annotations

import json
import pathlib


class MetricsWriter:
    def __init__(self, run_dir: str | pathlib.Path, tensorboard: bool = True):
        run_dir = pathlib.Path(run_dir)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        """split: "train", "eval", "layers" or "eval_layers". Values are numbers, per-layer lists
        (TensorBoard tag split/name/layer_NN) or matrices (JSONL only)."""
        self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        if self._tb is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{name}", value, step)
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                for layer, v in enumerate(value):
                    self._tb.add_scalar(f"{split}/{name}/layer_{layer:02d}", v, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | pathlib.Path, split: str = "train") -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]
