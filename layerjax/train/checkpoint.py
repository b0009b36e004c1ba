"""Orbax checkpoints of the train state and the data iterator position.

Each checkpoint is one step directory with two items: `state` (params, optimizer state, step,
RNG; written collectively, each process its own shards) and `data` (every process's grain
iterator state, gathered into one JSON list, since each process reads its own part of the data).
A checkpoint restores under any mesh: arrays are read into the current run's shardings. Orbax writes to a temporary directory and
renames it when complete, so a crash mid-save never leaves a checkpoint that looks finished.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from layerjax.config import CheckpointConfig, MeshConfig
from layerjax.train.step import TrainState


class Checkpointer:
    def __init__(self, run_dir: str | pathlib.Path, ckpt_cfg: CheckpointConfig):
        self.directory = pathlib.Path(run_dir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep, enable_async_checkpointing=ckpt_cfg.async_save,
            create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Called by every process: each contributes its shards and its data position."""
        data = {"process_count": jax.process_count(), "states": gather_json(data_state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)

    def restore(self, step: int, abstract_state: TrainState, shardings) -> tuple[TrainState, dict]:
        """Restores into `shardings` (a prefix tree of NamedShardings over abstract_state)."""
        full_shardings = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, abstract_state)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, full_shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        data = restored["data"]
        if data["process_count"] != jax.process_count():
            warnings.warn(f"checkpoint step {step} was written by {data['process_count']} process(es) and is "
                          f"restored by {jax.process_count()}: the model state carries over, but each process's "
                          "data position does not, so the data stream starts again")
            return restored["state"], None
        return restored["state"], data["states"][jax.process_index()]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def gather_json(value) -> list:
    """Every process's JSON-serialisable `value`, in process order (on every process)."""
    if jax.process_count() == 1:
        return [value]
    blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, lengths)]


def load_run(run_dir: str | pathlib.Path, step: int | None = None, overrides=()):
    """Loads a run for inference: its resolved config.toml and the params of a checkpoint
    (the latest unless `step`), on one device. Returns (cfg, setup, params, step)."""
    import dataclasses

    from layerjax.config import load_config
    from layerjax.train.state import build_setup

    run_dir = pathlib.Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a layerjax run directory?")
    cfg = load_config(str(config_path), overrides)
    # Whatever mesh trained it, inference reads the checkpoint onto one device.
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(num_devices=1))
    setup = build_setup(cfg)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
        state, _ = checkpointer.restore(step, setup.abstract_state, setup.state_shardings)
    finally:
        checkpointer.close()
    return cfg, setup, state.params, step
