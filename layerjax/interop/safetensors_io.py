"""Reading and writing Hugging Face safetensors checkpoints with the `safetensors` NumPy API.

A checkpoint is one `model.safetensors`, or shards named by `model.safetensors.index.json`. The
reader looks at headers first (names, shapes, dtypes: no weights), then hands out one tensor at a
time, so a converter holds the converted model plus one tensor, never two copies of the model.
The writer takes tensors as (name, shape, dtype, make) and builds them one shard at a time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import typing

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # Hugging Face's default max_shard_size, "5GB"

# safetensors header dtype names -> NumPy dtypes (bfloat16 through ml_dtypes, which JAX ships).
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class CheckpointFormatError(ValueError):
    """A Hugging Face directory's weights are missing, unreadable or do not fit the model."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: str  # NumPy name, e.g. "float32", "bfloat16"


def numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)

    return np.dtype(getattr(ml_dtypes, name) if name == "bfloat16" else name)


class SafetensorsReader:
    """The tensors of a Hugging Face directory, by name; `get` reads one at a time."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointFormatError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.directory.glob("*"))[:20]
            raise CheckpointFormatError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (found {found}); export the model with "
                "save_pretrained(..., safe_serialization=True); PyTorch .bin checkpoints are not read")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointFormatError(f"{index}: names shard {name}, which does not exist")
            try:
                with safe_open(str(path), framework="numpy") as f:
                    for key in f.keys():
                        tensor = f.get_slice(key)
                        dtype = _DTYPES.get(tensor.get_dtype())
                        if dtype is None:
                            raise CheckpointFormatError(f"{path}: tensor {key} has unsupported dtype {tensor.get_dtype()}")
                        self.tensors[key] = TensorInfo(path, tuple(tensor.get_shape()), dtype)
            except CheckpointFormatError:
                raise
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from None
        self._open: dict[pathlib.Path, typing.Any] = {}

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        handle = self._open.get(info.file)
        if handle is None:
            # Only the current shard stays open: its memory map is dropped when the next one opens.
            self.close()
            handle = self._open[info.file] = safe_open(str(info.file), framework="numpy").__enter__()
        return handle.get_tensor(name)

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write, built only when its shard is written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: typing.Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def write_safetensors(directory: str | pathlib.Path, tensors: list[PendingTensor],
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[pathlib.Path]:
    """Writes `tensors` as model.safetensors, or as numbered shards of at most max_shard_bytes
    (a larger single tensor gets a shard of its own) with an index, as Hugging Face lays them out."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for stale in [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a previous export's shards would confuse the loader
    weight_map = {}
    for name, shard in zip(names, shards):
        arrays = {}
        for tensor in shard:
            array = np.ascontiguousarray(tensor.make(), dtype=tensor.dtype)
            if array.shape != tensor.shape:
                raise AssertionError(f"{tensor.name}: built {array.shape}, planned {tensor.shape}")
            arrays[tensor.name] = array
            weight_map[tensor.name] = name
        save_file(arrays, str(directory / name), metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]
