"""A local Hugging Face directory (config.json + safetensors) -> a layerjax run directory.

The run directory holds `config.toml` (the equivalent layerjax config), a weights-only Orbax
checkpoint at step 0, the source's `config.json` and tokenizer files under `hf/`, and the
tokenizer.json that `data.tokenizer` points at. Nothing is downloaded. Every name and shape is
checked against the model from the headers alone, before any weight is read; then tensors are read
one at a time into the stacked parameter arrays, so host memory holds about one copy of the model.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
import numpy as np

from layerjax.config import Config, config_from_dict, to_toml
from layerjax.interop import families
from layerjax.interop.mapping import bind, group_bindings, hf_shape, param_leaves, path_name, target_shape
from layerjax.interop.safetensors_io import CheckpointFormatError, SafetensorsReader, numpy_dtype

HF_SUBDIR = "hf"  # the source's config.json and tokenizer files, kept for export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


def read_hf_config(hf_dir: pathlib.Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a local Hugging Face model directory (config.json + "
                                "model.safetensors); nothing is downloaded")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON ({e})") from None


def imported_config(hf: dict, out_dir: pathlib.Path, dtype: str, tokenizer: pathlib.Path | None) -> Config:
    """The layerjax config of an imported model: its model fields, text data through its own
    tokenizer (the corpus is named when training), and `train.init_from` pointing at the import, so
    that a run with another run_dir starts from these weights."""
    model = families.model_fields(hf)
    model.update(dtype=dtype, param_dtype=dtype)
    run_dir = str(out_dir.resolve())
    return config_from_dict({
        "model": model,
        "data": {"source": "text", "tokenizer": str(tokenizer.resolve()) if tokenizer else "byte",
                 "seq_len": min(Config().data.seq_len, model["max_seq_len"])},
        "train": {"run_dir": run_dir, "init_from": run_dir},
    })


def _check_names_and_shapes(reader: SafetensorsReader, bindings, leaves, family: str,
                            tied: bool) -> dict[str, str]:
    """{our canonical HF name: name in the file}; raises listing every missing, unexpected or
    mis-shaped tensor at once."""
    in_file = {}
    for name in reader.tensors:
        canonical = families.canonical_name(name, family)
        if families.is_ignored_buffer(canonical, family) or (tied and canonical == "lm_head.weight"):
            continue  # a tied head's copy of the embedding, or a non-weight buffer
        in_file[canonical] = name
    expected = {b.hf: hf_shape(b, leaves) for b in bindings}
    problems = []
    missing = sorted(set(expected) - set(in_file))
    unexpected = sorted(set(in_file) - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:20]}" + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:20]}" + (f" (+{len(unexpected) - 20} more)" if len(unexpected) > 20 else ""))
    for name in sorted(set(expected) & set(in_file)):
        got = reader.tensors[in_file[name]].shape
        if got != expected[name]:
            problems.append(f"{name} has shape {list(got)}, the config implies {list(expected[name])}")
    if problems:
        raise CheckpointFormatError(f"{reader.directory}: weights do not match config.json: " + "; ".join(problems))
    return in_file


class Conversion:
    """A Hugging Face directory checked against the layerjax model it becomes: `cfg`, `setup`,
    and `groups()`, which converts the weights one parameter group at a time (the parameters that
    one set of Hugging Face tensors fills, e.g. all layers' `wq`, or GPT-2's wq, wk and wv together)."""

    def __init__(self, hf_dir: str | pathlib.Path, dtype: str = "float32", out_dir: str | pathlib.Path | None = None):
        from layerjax.train.state import build_setup

        self.hf_dir = pathlib.Path(hf_dir)
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {dtype!r}: expected float32 or bfloat16")
        hf = read_hf_config(self.hf_dir)
        families.model_fields(hf)  # raises for an unsupported family or option, before anything is read
        self.family = hf["model_type"]
        has_tokenizer = (self.hf_dir / "tokenizer.json").is_file()
        out_dir = pathlib.Path(out_dir) if out_dir is not None else self.hf_dir.with_name(self.hf_dir.name + "_layerjax")
        self.cfg = imported_config(hf, out_dir, dtype, out_dir / "tokenizer.json" if has_tokenizer else None)
        self.reader = SafetensorsReader(self.hf_dir)
        self.setup = build_setup(self.cfg)
        self.leaves = param_leaves(self.setup.abstract_state.params)
        self.bindings = bind(families.tensor_rules(self.family), self.setup.plan, self.leaves)
        self.in_file = _check_names_and_shapes(self.reader, self.bindings, self.leaves, self.family,
                                               self.cfg.model.tie_embeddings)
        self.dtype = numpy_dtype(dtype)

    def groups(self, progress: bool = False):
        """Yields {parameter path: NumPy array} per group; memory holds one group at a time."""
        from tqdm import tqdm

        bar = tqdm(total=len(self.bindings), desc="import", unit="tensor", disable=not progress)
        try:
            for paths, bindings in group_bindings(self.bindings).items():
                arrays = {path: np.empty(self.leaves[path].shape, self.dtype) for path in paths}
                for binding in bindings:
                    tensor = self.reader.get(self.in_file[binding.hf])
                    shapes = [target_shape(self.leaves[p], slot) for p, slot in binding.targets]
                    for (path, slot), part in zip(binding.targets, binding.rule.to_ours(tensor, shapes)):
                        arrays[path][... if slot is None else slot] = part
                    del tensor
                    bar.update(1)
                yield arrays
                del arrays
        finally:
            bar.close()
            self.reader.close()


def load_hf(hf_dir: str | pathlib.Path, dtype: str = "float32", out_dir: str | pathlib.Path | None = None):
    """Reads a Hugging Face directory into layerjax parameters in memory, writing nothing.
    Returns (cfg, setup, params) with params an nnx.State of NumPy arrays."""
    conversion = Conversion(hf_dir, dtype, out_dir)
    arrays = {}
    for group in conversion.groups():
        arrays.update(group)
    params = jax.tree_util.tree_map_with_path(lambda path, _: arrays[path_name(path)],
                                              conversion.setup.abstract_state.params)
    return conversion.cfg, conversion.setup, params


def import_hf(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, dtype: str = "float32",
              progress: bool = True) -> dict:
    """Converts a Hugging Face directory into a layerjax run directory (see the module doc).
    Returns a small report: family, parameter count, seconds, run_dir."""
    from layerjax.train.checkpoint import ParamsWriter

    started = time.perf_counter()
    hf_dir, out_dir = pathlib.Path(hf_dir), pathlib.Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise FileExistsError(f"--out {out_dir} already holds checkpoints; choose a new directory")
    conversion = Conversion(hf_dir, dtype, out_dir)  # every check passes before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / HF_SUBDIR).mkdir(exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / HF_SUBDIR / name)
    if (hf_dir / "tokenizer.json").is_file():
        shutil.copy2(hf_dir / "tokenizer.json", out_dir / "tokenizer.json")
    # Group by group, so host memory holds one group (and Orbax's copy of it), not the model.
    with ParamsWriter(out_dir, step=0) as writer:
        for group in conversion.groups(progress):
            writer.write(group)
    (out_dir / "config.toml").write_text(to_toml(conversion.cfg))  # last: a run dir with a config is complete
    return {"family": conversion.family, "params": conversion.setup.num_params,
            "seconds": time.perf_counter() - started, "run_dir": str(out_dir.resolve())}
