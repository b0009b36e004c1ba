"""Orbax checkpoints of the train state and the data iterator position.

Each checkpoint is one step directory with two items: `state` (params, optimizer state, step,
RNG; written collectively, each process its own shards) and `data` (every process's grain
iterator state, gathered into one JSON list, since each process reads its own part of the data).
A weights-only checkpoint (a Hugging Face import, see `ParamsWriter`) has a `state` item that holds
only `params`, and no `data` item: a run resuming from it starts a fresh optimizer state and data
stream.
A checkpoint restores under any mesh: arrays are read into the current run's shardings. Orbax writes to a temporary directory and
renames it when complete, so a crash mid-save never leaves a checkpoint that looks finished.
"""

from __future__ import annotations

import json
import logging
import pathlib
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from layerjax.config import CheckpointConfig, MeshConfig
from layerjax.train.step import TrainState


class Checkpointer:
    def __init__(self, run_dir: str | pathlib.Path, ckpt_cfg: CheckpointConfig, read_only: bool = False):
        """read_only: for readers (sampling, analysis, conversion) that may run beside a training
        run: no directory is created and no temporary (in-progress) checkpoint is cleaned up."""
        self.directory = pathlib.Path(run_dir).resolve() / "checkpoints"
        writer_options = dict(max_to_keep=ckpt_cfg.keep, enable_async_checkpointing=ckpt_cfg.async_save,
                              create=True, cleanup_tmp_directories=True)
        reader_options = dict(max_to_keep=None, save_interval_steps=0, enable_async_checkpointing=False,
                              create=False, read_only=True)
        options = ocp.CheckpointManagerOptions(**(reader_options if read_only else writer_options))
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # Orbax warns that a read-only manager is read-only
            absl_log.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        finally:
            absl_log.setLevel(level)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_bytes(self, step: int) -> int:
        """Bytes on disk of one saved step (for reports: a fine-tune's adapter checkpoint size)."""
        return sum(f.stat().st_size for f in (self.directory / str(step)).rglob("*") if f.is_file())

    def has_train_state(self, step: int) -> bool:
        """False for a weights-only checkpoint (see `ParamsWriter`): full ones always have `data`."""
        return (self.directory / str(step) / "data").is_dir()

    def restore_params(self, step: int, abstract_params, shardings):
        """The parameters of a checkpoint of either kind, read into `shardings` (a prefix tree of
        NamedShardings over abstract_params); the optimizer state is never read, so memory holds
        one copy of the weights."""
        return self._restore_part(step, {"params": _sharded_target(abstract_params, shardings)})["params"]

    def restore_param_leaves(self, step: int, abstract_leaves: dict) -> dict:
        """Some parameters only, on one device: {dotted path (`interop.mapping.path_name`):
        ShapeDtypeStruct} -> {path: array}; lets a converter hold one group of weights at a time."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = _nest({path: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)
                        for path, a in abstract_leaves.items()})
        restored = self._restore_part(step, {"params": target})["params"]
        return {path: _leaf(restored, path) for path in abstract_leaves}

    def _restore_part(self, step: int, target):
        """A subtree of the `state` item (partial restore: nothing else is read)."""
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        return reader.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Called by every process: each contributes its shards and its data position."""
        data = {"process_count": jax.process_count(), "states": gather_json(data_state)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)

    def restore_newest_readable(self, attempt):
        """(step, attempt(step)) for the newest checkpoint that `attempt` can read, or (None, None)
        when there is none. A checkpoint that cannot be read (truncated, emptied, half-copied) is
        renamed STEP.unreadable, kept for inspection, with a warning naming it and why; the next
        older one is tried, so a damaged newest checkpoint costs the steps since the one before,
        never the run. When every checkpoint fails, RunDirError lists them all."""
        from layerjax.train.rundir import RunDirError

        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, attempt(step)
            except Exception as e:  # Orbax and TensorStore raise many types for damaged files
                reason = _first_line(e)
                failures.append(f"step {step}: {reason}")
                warnings.warn(f"checkpoint {self.directory / str(step)} cannot be read ({reason}); "
                              f"it is kept as {step}.unreadable and the run falls back to the previous checkpoint",
                              stacklevel=2)
                self._set_aside(step)
        if failures:
            raise RunDirError(f"no readable checkpoint in {self.directory} ({'; '.join(failures)}); the damaged "
                              "ones were renamed STEP.unreadable: delete them to start over, or restore a backup")
        return None, None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = self.directory / str(step)
            path.rename(path.with_name(f"{step}.unreadable"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"layerjax set aside checkpoint {step}")
        self.manager.reload()

    def restore(self, step: int, abstract_state: TrainState, shardings) -> tuple[TrainState, dict]:
        """Restores into `shardings` (a prefix tree of NamedShardings over abstract_state)."""
        target = _sharded_target(abstract_state, shardings)
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


class ParamsWriter:
    """Writes a weights-only checkpoint at `step` one group of parameters at a time (Orbax's partial
    save), so that a converter never holds the whole model: `with ParamsWriter(run_dir, 0) as w:
    w.write({"embed.table": array, ...})`. The checkpoint appears only when the block exits cleanly."""

    def __init__(self, run_dir: str | pathlib.Path, step: int):
        self.path = pathlib.Path(run_dir).resolve() / "checkpoints" / str(step)

    def write(self, arrays: dict) -> None:
        """arrays: {dotted parameter path (as `interop.mapping.path_name` spells it): array}."""
        import orbax.checkpoint.experimental.v1 as ocp_v1

        ocp_v1.partial.save(self.path, {"params": _nest(arrays)})

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            import orbax.checkpoint.experimental.v1 as ocp_v1

            ocp_v1.partial.finalize(self.path)


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {text[:limit]}"


def _nest(leaves: dict) -> dict:
    """{"stacks.0.blocks.attn.wq": x} -> the nested dicts a saved params tree has for it, ending in
    "value" (where an nnx.Variable keeps its array)."""
    tree: dict = {}
    for path, leaf in leaves.items():
        node = tree
        for key in path.split("."):
            node = node.setdefault(key, {})
        node["value"] = leaf
    return tree


def _leaf(tree: dict, path: str):
    for key in path.split("."):
        tree = tree[key]
    return tree["value"]


def _sharded_target(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the sharding each leaf is read into."""
    full_shardings = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, abstract_tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, full_shardings)


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
    params, step = load_params(run_dir, setup, step)
    return cfg, setup, params, step


def load_params(run_dir: str | pathlib.Path, setup, step: int | None = None):
    """The parameters of run_dir's checkpoint `step` (default: the latest), read into `setup`'s
    shardings; the shapes must match setup's model. Returns (params, step).
    For a fine-tune (see layerjax.train.finetune) these are its base's weights plus its adapters."""
    from layerjax.train.finetune import frozen_base, is_finetune
    from layerjax.train.step import join_trainable, split_trainable

    if not (pathlib.Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"no checkpoint in {pathlib.Path(run_dir).resolve() / 'checkpoints'}")
    checkpointer = Checkpointer(run_dir, CheckpointConfig(async_save=False), read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
        if not (checkpointer.directory / str(step)).is_dir():
            raise FileNotFoundError(f"no checkpoint for step {step} in {checkpointer.directory}; "
                                    f"it has steps {sorted(checkpointer.manager.all_steps())}")
        m = setup.cfg.model
        if is_finetune(m):  # the run's checkpoint holds the adapters; the base comes from its run
            abstract, shardings = (split_trainable(t, m)[0] for t in (setup.abstract_state.params,
                                                                    setup.state_shardings.params))
            params = join_trainable(checkpointer.restore_params(step, abstract, shardings),
                                    frozen_base(setup, pathlib.Path(run_dir)))
        else:
            params = checkpointer.restore_params(step, setup.abstract_state.params, setup.state_shardings.params)
    finally:
        checkpointer.close()
    return params, step
