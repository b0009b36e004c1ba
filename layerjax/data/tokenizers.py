"""Text tokenizers: a dependency-free byte tokenizer and a wrapper over Hugging Face tokenizer.json.

Both expose the same small interface the pipeline needs (`vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `encode`, `decode`), so the pipeline never asks which one it holds.
"""

from __future__ import annotations

import json
import pathlib
import typing

import numpy as np

from layerjax.config import ConfigError


class Tokenizer(typing.Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: typing.Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; three specials follow, so any text round-trips with no files."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for long documents: no Python list of a million ints."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: typing.Iterable[int]) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()
        kept = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
        return kept.tobytes().decode("utf-8", errors="replace")


# Special-token spellings tried in order when a tokenizer.json is loaded; the first one present
# in the vocabulary is used, otherwise a new token is appended after the vocabulary. The lists
# share no spelling, so the three roles get distinct ids unless a fixed model vocabulary leaves no
# room to append (see HFTokenizer).
_SPECIAL_CANDIDATES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>", "[CLS]"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[EOS]", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
}


_TOKENIZER_FIX = "give the tokenizer.json saved with a Hugging Face tokenizer, or data.tokenizer=byte"


def _check_tokenizer_json(path: pathlib.Path) -> None:
    """Refuses a file that is not a tokenizer.json with a line naming it, before the tokenizers
    library (when it is installed at all) answers with a bare parser error."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ConfigError(f"data.tokenizer={str(path)!r} is not JSON{where}; {_TOKENIZER_FIX}") from None
    # Every tokenizer.json has a "model" object (BPE, WordPiece, Unigram, ...) holding the vocabulary.
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise ConfigError(f"data.tokenizer={str(path)!r} is JSON but not a tokenizer (it has no \"model\" "
                          f"object); {_TOKENIZER_FIX}")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json, with bos/eos/pad guaranteed to exist."""

    def __init__(self, path: str | pathlib.Path, max_vocab: int = 0):
        """max_vocab: the model's vocabulary size when it is fixed (an imported model). A missing
        special that has no room left there reuses eos (padding is positional in the pipeline, so
        a pad equal to eos never hides eos from the loss)."""
        _check_tokenizer_json(pathlib.Path(path))
        try:
            import tokenizers  # lazy: an optional dependency
        except ImportError:
            raise ConfigError(
                f"data.tokenizer={str(path)!r} needs the Hugging Face 'tokenizers' package: "
                "pip install 'layerjax[tokenizers]' (or use data.tokenizer=byte)") from None
        self.path = pathlib.Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception for any file it cannot read
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"data.tokenizer={str(path)!r} is not a tokenizer the Hugging Face tokenizers "
                              f"library can load ({reason}); {_TOKENIZER_FIX}") from None
        base_size = self._tok.get_vocab_size(with_added_tokens=True)
        next_free = base_size
        ids = {role: next((self._tok.token_to_id(c) for c in candidates if self._tok.token_to_id(c) is not None), None)
               for role, candidates in _SPECIAL_CANDIDATES.items()}
        for role in _SPECIAL_CANDIDATES:
            if ids[role] is not None:
                continue
            if max_vocab and next_free >= max_vocab:  # no room in a fixed vocabulary
                if ids["eos"] is None:
                    raise ConfigError(
                        f"data.tokenizer={str(path)!r} has no end-of-text token "
                        f"({', '.join(_SPECIAL_CANDIDATES['eos'])}) and model.vocab_size={max_vocab} "
                        "leaves no room to add one")
                ids[role] = ids["eos"]
            else:  # appended ids exist only for the model; decode skips them
                ids[role], next_free = next_free, next_free + 1
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self._base_size = base_size
        self.vocab_size = next_free

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: typing.Iterable[int]) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id}
        kept = [int(i) for i in ids if int(i) not in specials and 0 <= int(i) < self._base_size]
        return self._tok.decode(kept, skip_special_tokens=True)


def build_tokenizer(data_cfg, max_vocab: int = 0) -> ByteTokenizer | HFTokenizer:
    """`data.tokenizer` is "byte" or a path to a tokenizer.json; max_vocab: the model's fixed
    vocabulary size, if any (see HFTokenizer)."""
    name = data_cfg.tokenizer
    if name == "byte":
        return ByteTokenizer()
    path = pathlib.Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data.tokenizer={name!r}: no such file; give a path to a Hugging Face "
            "tokenizer.json or data.tokenizer=byte")
    return HFTokenizer(path, max_vocab)
