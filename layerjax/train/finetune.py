"""Fine-tuning runs: adapters trained on a frozen base that lives in another run directory.

A run with `model.adapter.kind` set trains only adapter and router weights. Its checkpoints hold
those (and their optimizer state) alone, so a MoLA checkpoint is megabytes, not a copy of the
base; `base.json` in the run directory names the base run and the step it was built on
(`train.init_from`, latest step at the start), and every restore reassembles base + adapters.
Without `train.init_from` the base is the seed's random initialisation (for tests and ablations
from scratch), which a resume reproduces exactly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from layerjax.config import ConfigError, ModelConfig, load_config
from layerjax.train.step import TrainState, join_trainable, split_trainable

BASE_FILE = "base.json"
# Model fields a base may differ in from the fine-tuned model without changing its weights' meaning.
_FREE_FIELDS = ("adapter", "dtype", "param_dtype", "scan_layers", "scan_unroll", "remat")


def is_finetune(m: ModelConfig) -> bool:
    return m.adapter.kind != "none"


def base_model_config(m: ModelConfig) -> ModelConfig:
    return dataclasses.replace(m, adapter=dataclasses.replace(m.adapter, kind="none"))


def checkpoint_view(state_like, m: ModelConfig):
    """What a checkpoint holds: the whole state, or for a fine-tune only the trainable params (and
    the optimizer state, step, RNG). Works on states, abstract states and shardings alike."""
    if not is_finetune(m):
        return state_like
    return state_like.replace(params=split_trainable(state_like.params, m)[0])


def base_reference(run_dir: pathlib.Path) -> dict | None:
    path = pathlib.Path(run_dir) / BASE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_base_reference(run_dir: pathlib.Path, base_run: str, step: int) -> None:
    (pathlib.Path(run_dir) / BASE_FILE).write_text(
        json.dumps({"run_dir": str(pathlib.Path(base_run).resolve()), "step": step}, indent=2) + "\n")


def check_base_config(base_run: str | pathlib.Path, m: ModelConfig) -> None:
    """Refuses a base whose model differs from this fine-tune's in anything but adapters/dtypes."""
    path = pathlib.Path(base_run) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"train.init_from={str(base_run)!r}: {path} not found; give the base model's run "
                          "directory (e.g. one written by tools/import_hf.py)")
    base = load_config(str(path)).model
    differ = [f"model.{f.name}: base {getattr(base, f.name)!r}, here {getattr(m, f.name)!r}"
              for f in dataclasses.fields(m)
              if f.name not in _FREE_FIELDS and getattr(base, f.name) != getattr(m, f.name)]
    if differ:
        raise ConfigError(f"train.init_from={str(base_run)!r} is a different model: " + "; ".join(differ)
                          + ". Start from the base's config.toml (-c BASE/config.toml) and add model.adapter.*")


def frozen_from_base(setup, base_run: str | pathlib.Path, step: int | None = None):
    """The base run's parameters as this fine-tune's frozen tree (its segments split by expert
    count, so layers are re-sliced from the base's segments), in setup's shardings.
    Returns (frozen, step)."""
    from layerjax.train.checkpoint import Checkpointer
    from layerjax.config import CheckpointConfig
    from layerjax.train.state import build_setup

    m = setup.cfg.model
    base_setup = build_setup(dataclasses.replace(setup.cfg, model=dataclasses.replace(
        base_model_config(m), param_dtype=m.param_dtype)))
    checkpointer = Checkpointer(base_run, CheckpointConfig(async_save=False), read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"train.init_from={str(base_run)!r}: no checkpoint in {checkpointer.directory}")
        base = checkpointer.restore_params(step, base_setup.abstract_state.params, base_setup.state_shardings.params)
    finally:
        checkpointer.close()
    base_tree = base.to_pure_dict()
    by_layer = {}  # layer -> (base segment index, slot)
    for s, segment in enumerate(base_setup.plan.segments):
        for slot, layer in enumerate(segment.layers):
            by_layer[layer] = (s, slot)
    _, abstract_frozen = split_trainable(setup.abstract_state.params, m)
    frozen_tree = abstract_frozen.to_pure_dict()
    for s, segment in enumerate(setup.plan.segments):
        sources = [by_layer[layer] for layer in segment.layers]
        base_s, first = sources[0]
        assert all(b == base_s for b, _ in sources), "a fine-tune segment spans two base segments"
        frozen_tree["stacks"][s] = jax.tree.map(lambda a: a[first:first + segment.num_layers],
                                                base_tree["stacks"][base_s])
    for key in frozen_tree:
        if key != "stacks":
            frozen_tree[key] = base_tree[key]
    _, frozen_shardings = split_trainable(setup.state_shardings.params, m)
    abstract_frozen.replace_by_pure_dict(frozen_tree)
    return jax.device_put(abstract_frozen, frozen_shardings), step


def frozen_base(setup, run_dir: pathlib.Path):
    """This fine-tune's frozen base: from the run named in run_dir's base.json, else the seed's
    random initialisation (the same on every resume)."""
    reference = base_reference(run_dir)
    if reference is not None:
        return frozen_from_base(setup, reference["run_dir"], reference["step"])[0]
    from layerjax.train.state import init_state

    return split_trainable(init_state(setup, setup.cfg.train.seed).params, setup.cfg.model)[1]


def new_finetune_state(setup, run_dir: pathlib.Path, is_main: bool) -> TrainState:
    """Fresh adapters on the base named by train.init_from (recorded in base.json)."""
    from layerjax.train.state import init_state

    cfg = setup.cfg
    if cfg.train.init_from:  # a wrong base is refused before anything is compiled
        check_base_config(cfg.train.init_from, cfg.model)
    state = init_state(setup, cfg.train.seed)
    if not cfg.train.init_from:
        return state
    frozen, step = frozen_from_base(setup, cfg.train.init_from)
    if is_main:
        write_base_reference(run_dir, cfg.train.init_from, step)
    return state.replace(params=join_trainable(split_trainable(state.params, cfg.model)[0], frozen))
