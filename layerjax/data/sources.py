"""Local text corpora: .txt, .jsonl and .parquet files read into a list of documents.

A .txt file is one document (long ones are cut into model-sized chunks later, when packing); a
.jsonl line and a .parquet row are one document each, with the text under `data.text_field`.
Every error names the file, and the line or row where there is one, because a bad line in a
million-line file is otherwise a needle in a haystack.
"""

from __future__ import annotations

import json
import pathlib
import typing

from layerjax.config import ConfigError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """A data file is unreadable or holds something other than what its format promises."""


def read_documents(paths: typing.Sequence[str], text_field: str = "text") -> list[str]:
    """All documents of all files, in the order the files are given."""
    documents: list[str] = []
    for name in paths:
        path = pathlib.Path(name).expanduser()
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_EXTENSIONS:
            raise ConfigError(
                f"data.paths: {path} has unsupported extension {suffix or '(none)'!r}; "
                f"supported: {', '.join(SUPPORTED_EXTENSIONS)}")
        if not path.is_file():
            raise ConfigError(f"data.paths: {path} does not exist (or is not a file)")
        reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix]
        found = reader(path, text_field)
        if not found:
            raise DataError(f"{path}: file is empty (no documents)")
        documents.extend(found)
    return documents


def _decode_utf8(path: pathlib.Path, data: bytes, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _read_txt(path: pathlib.Path, text_field: str) -> list[str]:
    text = _decode_utf8(path, path.read_bytes())
    return [text] if text.strip() else []


def _read_jsonl(path: pathlib.Path, text_field: str) -> list[str]:
    documents = []
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line = _decode_utf8(path, raw, line_number)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{line_number}: no {text_field!r} field (found {keys}); "
                    "set data.text_field to the field holding the text")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: field {text_field!r} is "
                                f"{type(text).__name__}, not a string")
            documents.append(text)
    return documents


def _read_parquet(path: pathlib.Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq  # only needed for parquet

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in table.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {table.column_names}); "
                        "set data.text_field to the column holding the text")
    texts = table.column(text_field).to_pylist()
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{path}: row {row} of column {text_field!r} is "
                            f"{type(text).__name__}, not a string")
    return texts


def split_train_val(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic held-out split: the last `val_fraction` of the corpus.

    One document (a single long .txt) is cut by character position; several documents are split
    whole, so no document leaks into both sides.
    """
    if val_fraction <= 0 or not documents:
        return documents, []
    if len(documents) == 1:
        text = documents[0]
        cut = int(round(len(text) * (1 - val_fraction)))
        return [text[:cut]], ([text[cut:]] if cut < len(text) else [])
    num_val = min(max(1, round(len(documents) * val_fraction)), len(documents) - 1)
    return documents[:-num_val], documents[-num_val:]
