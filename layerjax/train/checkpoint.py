"""Orbax checkpoints of the train state and the data iterator position.

Each checkpoint is one step directory with two items: `state` (params, optimizer state, step,
RNG) and `data` (the grain iterator state as JSON). Orbax writes to a temporary directory and
renames it when complete, so a crash mid-save never leaves a checkpoint that looks finished.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from layerjax.config import CheckpointConfig
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
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: TrainState, shardings) -> tuple[TrainState, dict]:
        """Restores into `shardings` (a prefix tree of NamedShardings over abstract_state)."""
        full_shardings = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, abstract_state)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, full_shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, num_devices=1))
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
