"""Keeping a run directory trustworthy: one writer at a time, a resume only under the config
that trained it, metrics that hold each step once, and files that are either whole or absent.

A run directory holds `config.toml` (the resolved config that trained it), `checkpoints/`,
`metrics.jsonl`, `summary.json`, plots, and `tokenizer.json` when the data uses a tokenizer file.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import pathlib
import socket

from layerjax.config import Config, ConfigError, load_config, to_dict

LOCK_NAME = ".lock"

# Settings a resume may change freely: they decide how the run is observed, saved or laid out on
# devices, or where the run lives, never what it computes (a checkpoint restores under any mesh).
FREE_PREFIXES = ("logging.", "checkpoint.", "mesh.", "train.log_every", "train.eval_every",
                 "train.on_nonfinite", "train.max_skipped", "train.profile_steps", "train.init_from", "train.run_dir",
                 "model.remat", "model.attention_impl", "model.attention_chunk", "model.attention_block",
                 "model.loss_chunk", "model.canon_impl", "model.scan_unroll", "model.matmul_impl")
# Settings a resume may change only with --allow-config-change: the model and the data stream stay
# the same, but the optimisation continues differently from how it started (a longer or shorter
# schedule, another learning rate, more eval batches).
SAFE_PREFIXES = ("train.steps", "train.microbatches", "train.z_loss", "train.seed", "optim.",
                 "data.num_eval_batches")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (held by another process, unreadable, full)."""


def write_atomic_bytes(path: pathlib.Path, data: bytes) -> None:
    """Writes a file whole or not at all: a kill mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_atomic(path: pathlib.Path, text: str) -> None:
    write_atomic_bytes(path, text.encode())


class RunLock:
    """An exclusive lock on a run directory, held while one process trains in it.

    An advisory `flock` on `.lock`: the kernel drops it when the owning process exits, however it
    exits, so a lock left by a killed run is never stale. The file records who holds it, for the
    message the second writer gets."""

    def __init__(self, run_dir: pathlib.Path):
        self.path = run_dir / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"{self.path.parent} is in use by {owner}; wait for that run to end, stop it, "
                              "or choose another train.run_dir") from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"process {os.getpid()} on {socket.gethostname()} (since {started})\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _kind(key: str) -> str:
    if key.startswith(FREE_PREFIXES):
        return "free"
    if key.startswith(SAFE_PREFIXES):
        return "safe"
    return "refused"


def saved_config(run_dir: pathlib.Path) -> Config | None:
    path = run_dir / "config.toml"
    return load_config(str(path)) if path.exists() else None


def config_changes(old: Config, new: Config) -> list[tuple[str, object, object, str]]:
    """(key, old value, new value, kind) for every setting that differs; kind is free, safe or
    refused (see FREE_PREFIXES / SAFE_PREFIXES)."""
    before, after = _flat(to_dict(old)), _flat(to_dict(new))
    changes = []
    for key in sorted(set(before) | set(after)):
        was, now = before.get(key), after.get(key)
        if was == now or (key == "model.vocab_size" and now == 0):  # 0: still to be read from the data
            continue
        if key == "data.tokenizer" and _same_file(was, now):  # the run keeps its own copy
            continue
        changes.append((key, was, now, _kind(key)))
    return changes


def _same_file(a, b) -> bool:
    try:
        return pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()
    except (OSError, TypeError):
        return False


def check_resume_config(run_dir: pathlib.Path, old: Config, new: Config, allow_change: bool) -> list[str]:
    """Refuses (ConfigError, before anything is written) a resume whose config changes the model or
    the data stream, or changes the optimisation without allow_change. Returns the accepted
    changes as "key: old -> new" lines, for the log."""
    changes = config_changes(old, new)
    blocking = [c for c in changes if c[3] == "refused" or (c[3] == "safe" and not allow_change)]
    if blocking:
        lines = [f"  {key}: {was!r} -> {now!r}" + ("" if kind == "refused" else "  (allowed with --allow-config-change)")
                 for key, was, now, kind in blocking]
        refused = any(kind == "refused" for *_, kind in blocking)
        fix = (f"To train a changed model or data, start a new run (another train.run_dir), or start from this "
               f"run's weights with train.init_from={run_dir}." if refused else
               "Add --allow-config-change to continue this run under the new settings (the learning-rate "
               "schedule follows the new train.steps and optim.*).")
        raise ConfigError(f"{run_dir} was trained with a different config; nothing was changed:\n"
                          + "\n".join(lines) + f"\n{fix}")
    return [f"{key}: {was!r} -> {now!r}" for key, was, now, _ in changes]


def read_summary(run_dir: pathlib.Path) -> dict | None:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def trim_metrics(run_dir: pathlib.Path, last_step: int | None) -> int:
    """Drops the rows of metrics.jsonl a resume will write again (steps after `last_step`, the
    restored checkpoint; every row when starting over) and a line torn by a kill. Returns how many
    rows were dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the last line of a killed run may be cut short
            dropped += 1
            continue
        if last_step is not None and row.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def metrics_before(rows: list[dict]) -> dict:
    """The last row of a split, without its step and split keys."""
    return {k: v for k, v in rows[-1].items() if k not in ("step", "split")} if rows else {}


TOKENIZER_COPY = "tokenizer.json"


def relocate_tokenizer(cfg: Config, run_dir: pathlib.Path) -> Config:
    """Copies the data's tokenizer file into the run directory and points the config at the copy
    by a name relative to config.toml (paths in a TOML resolve against its folder), so the run
    directory alone, wherever it is moved, is enough to sample from or resume the run."""
    source = cfg.data.tokenizer
    if source == "byte" or not source:
        return cfg
    copy = run_dir.resolve() / TOKENIZER_COPY
    if pathlib.Path(source).resolve() != copy:
        write_atomic_bytes(copy, pathlib.Path(source).read_bytes())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=TOKENIZER_COPY))
