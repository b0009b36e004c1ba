"""A layerjax run directory -> a Hugging Face directory (config.json + safetensors) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

The family follows from the model's fields (`families.export_family`); a model that no family
represents (Mix-LN, LayerNorm scaling, DeepNorm, canon layers, per-layer overrides, ...) is refused
with the field that has no equivalent, before any file is written. Parameters are restored one group at
a time (all layers' `wq`, then `wk`, ...) and tensors built one shard at a time, so an export holds
about one shard and one group of weights, never the model twice.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

import numpy as np

from layerjax.config import CheckpointConfig, ConfigError, MeshConfig, load_config
from layerjax.interop import families
from layerjax.interop.hf_import import HF_SUBDIR, TOKENIZER_FILES
from layerjax.interop.mapping import bind, group_bindings, hf_shape, param_leaves
from layerjax.interop.safetensors_io import DEFAULT_MAX_SHARD_BYTES, PendingTensor, numpy_dtype, write_safetensors

# Token ids that belong to the tokenizer, not the architecture: kept from the imported config.json.
_CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class _GroupCache:
    """The parameters of one group (those a set of Hugging Face tensors reads, e.g. all layers'
    `wq`), fetched on demand by `fetch(paths) -> {path: array}`, so that an export restoring from a
    checkpoint holds one group of weights at a time."""

    def __init__(self, fetch):
        self.fetch = fetch
        self.paths: tuple[str, ...] = ()
        self.arrays: dict[str, np.ndarray] = {}

    def parts(self, binding) -> list[np.ndarray]:
        paths = tuple(path for path, _ in binding.targets)
        if not set(paths) <= set(self.paths):
            self.arrays = {}  # drop the previous group before reading the next
            self.arrays = {path: np.asarray(array) for path, array in self.fetch(paths).items()}
            self.paths = paths
        return [self.arrays[path] if slot is None else self.arrays[path][slot] for path, slot in binding.targets]


def _hf_source(run_dir: pathlib.Path) -> pathlib.Path | None:
    """The `hf/` folder (source config.json and tokenizer files) of the import this run descends
    from: its own, or that of the run it started from (`train.init_from`, followed back)."""
    seen = set()
    while run_dir is not None and run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        if (run_dir / HF_SUBDIR / "config.json").is_file():
            return run_dir / HF_SUBDIR
        try:
            parent = load_config(str(run_dir / "config.toml")).train.init_from
        except (ConfigError, OSError):
            return None
        run_dir = pathlib.Path(parent) if parent else None
    return None


def export_hf(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, step: int | None = None,
              dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Writes the checkpoint `step` (default: the latest) of run_dir as a Hugging Face directory in
    `dtype` (default: the run's parameter dtype). Returns a small report."""
    from layerjax.model.merge import merge_lora, merged_config
    from layerjax.train.checkpoint import Checkpointer, load_run
    from layerjax.train.state import build_setup

    started = time.perf_counter()
    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.toml'} not found: is {run_dir} a layerjax run directory?")
    # Whatever mesh trained it, the export reads onto one device.
    cfg = dataclasses.replace(load_config(str(run_dir / "config.toml")), mesh=MeshConfig(num_devices=1))
    source = _hf_source(run_dir)
    original = json.loads((source / "config.json").read_text()) if source else {}
    # Plain LoRA is folded into its base first; everything else is refused before any weight is read.
    lora = cfg.model.adapter.kind == "lora"
    model = merged_config(cfg.model) if lora else cfg.model
    family = families.export_family(model, preferred=original.get("model_type"))
    dtype = dtype or cfg.model.param_dtype
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: expected float32 or bfloat16")
    checkpointer = Checkpointer(run_dir, CheckpointConfig(async_save=False), read_only=True)
    step = checkpointer.latest_step() if step is None else step
    if step is None or not (checkpointer.directory / str(step)).is_dir():
        found = sorted(checkpointer.manager.all_steps())
        checkpointer.close()
        raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint {'' if step is None else step} "
                                f"to export (steps present: {found})")
    setup = build_setup(dataclasses.replace(cfg, model=model))
    leaves = param_leaves(setup.abstract_state.params)
    if lora:  # base + adapters, merged in memory (a base and a rank-r delta: about one model copy)
        merged = param_leaves(merge_lora(cfg.model, load_run(run_dir, step)[2]))
        fetch = lambda paths: {p: merged[p] for p in paths}
    else:
        fetch = lambda paths: checkpointer.restore_param_leaves(step, {p: leaves[p] for p in paths})
    config = families.hf_config(model, family)
    config["dtype"] = dtype
    config.update({k: original[k] for k in _CARRIED_KEYS if k in original})
    bindings = bind(families.tensor_rules(family), setup.plan, leaves)
    cache = _GroupCache(fetch)
    np_dtype = numpy_dtype(dtype)
    pending = [PendingTensor(b.hf, hf_shape(b, leaves), np_dtype, lambda b=b: b.rule.to_hf(cache.parts(b), xp=np))
               for group in group_bindings(bindings).values() for b in group]  # the index maps any order
    try:
        files = write_safetensors(out_dir, pending, max_shard_bytes)
    finally:
        checkpointer.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if source and (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
    tokenizer = pathlib.Path(cfg.data.tokenizer)
    if cfg.data.tokenizer != "byte" and tokenizer.is_file():  # the tokenizer the run trained with
        shutil.copy2(tokenizer, out_dir / "tokenizer.json")
    return {"family": family, "step": step, "files": [str(f) for f in files],
            "bytes": sum(t.nbytes for t in pending), "seconds": time.perf_counter() - started}
