"""Supervised fine-tuning records: JSONL prompt/response or chat records -> tokens with loss weights.

A record is one JSONL line, either

    {"prompt": "...", "response": "...", "task": "optional name"}        (fields: data.sft.*_field)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "task": ...}

A prompt/response record is the chat [user: prompt, assistant: response]. A chat is rendered to
text pieces by a template, each piece marked trained or not; each piece is tokenized on its own
(so no token straddles a prompt/response boundary) and the document is

    bos  piece tokens ...   with eos inserted right after every assistant turn's content

Loss weights are 1 on assistant contents and their eos, 0 elsewhere (bos, template markers, the
system and user turns). Templates:

- "simple": `<|system|>\\n{content}\\n`, `<|user|>\\n{content}\\n`, `<|assistant|>\\n{content}<eos>`,
  where <eos> is the tokenizer's eos id (not text) and only `{content}<eos>` of assistant turns
  is trained.
- "jinja": a Hugging Face style chat template (`data.sft.chat_template`), rendered by jinja2's
  sandbox with `messages`, `bos_token=""`, `eos_token=""`, `add_generation_prompt=False`. Each
  assistant content is replaced by a sentinel while rendering, and the text is cut there: the
  template's own text is never trained, the content (+ eos) always is. So the template must write
  assistant contents verbatim, once each; the pipeline adds bos and eos ids itself.

Every error names file:line and the field.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing

import numpy as np

from layerjax.config import ConfigError
from layerjax.data.sources import DataError, _decode_utf8

ROLES = ("system", "user", "assistant")
SIMPLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
MAX_TASKS = 63  # exact-match buckets 1..63 (the train loop gathers buckets 1..64 across processes)


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated record: its chat turns, optional task name, and where it came from."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    task: str
    where: str  # "file:line", for errors raised later (templates, lengths)


# ---------------------------------------------------------------- reading


def read_records(paths: typing.Sequence[str], sft_cfg) -> list[Record]:
    """Every record of every .jsonl file in order, validated; bad ones raise DataError naming file:line."""
    records: list[Record] = []
    for name in paths:
        path = pathlib.Path(name).expanduser()
        if path.suffix.lower() != ".jsonl":
            raise ConfigError(f"data.paths: {path} is not a .jsonl file; data.source=sft reads JSONL records "
                              "(one {prompt, response} or {messages} object per line)")
        if not path.is_file():
            raise ConfigError(f"data.paths: {path} does not exist (or is not a file)")
        found = []
        with path.open("rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if raw.strip():
                    found.append(_parse_record(_decode_utf8(path, raw, line_number), f"{path}:{line_number}", sft_cfg))
        if not found:
            raise DataError(f"{path}: file is empty (no records)")
        records.extend(found)
    return records


def _parse_record(line: str, where: str, c) -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    task = ""
    if c.task_field and c.task_field in record:
        task = record[c.task_field]
        if not isinstance(task, str) or not task:
            raise DataError(f"{where}: field {c.task_field!r} must be a non-empty string, got {task!r} "
                            "(set data.sft.task_field='' to ignore it)")
    if c.messages_field in record:
        messages = _parse_messages(record[c.messages_field], where, c.messages_field)
    elif c.prompt_field in record or c.response_field in record:
        for key in (c.prompt_field, c.response_field):
            if key not in record:
                raise DataError(f"{where}: no {key!r} field (found {sorted(record)}); a prompt/response record "
                                f"needs both data.sft.prompt_field={c.prompt_field!r} and "
                                f"data.sft.response_field={c.response_field!r}")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: field {key!r} is {type(record[key]).__name__}, not a string")
        if not record[c.response_field]:
            raise DataError(f"{where}: field {c.response_field!r} is empty: nothing to train on")
        messages = (("user", record[c.prompt_field]), ("assistant", record[c.response_field]))
    else:
        raise DataError(
            f"{where}: neither {c.messages_field!r} nor {c.prompt_field!r}/{c.response_field!r} fields (found "
            f"{sorted(record)}); set data.sft.messages_field or data.sft.prompt_field/response_field")
    return Record(messages, task, where)


def _parse_messages(messages, where: str, field: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} objects")
    parsed = []
    for i, message in enumerate(messages):
        at = f"{where}: {field}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{at} must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; roles are {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: field 'content' is {type(content).__name__}, not a string")
        if role == "assistant" and not content:
            raise DataError(f"{at}: field 'content' is empty: an assistant turn must say something")
        parsed.append((role, content))
    if parsed[-1][0] != "assistant":
        raise DataError(f"{where}: field {field!r} ends with a {parsed[-1][0]!r} turn; a chat must end with an "
                        "assistant turn (the turns after it would never be trained)")
    return tuple(parsed)


def split_records(records: list[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """The last `val_fraction` of the records (at least one, never all) are held out, as for text."""
    if val_fraction <= 0 or len(records) < 2:
        return records, []
    num_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    return records[:-num_val], records[-num_val:]


# ---------------------------------------------------------------- templates


Piece = tuple[str, bool]  # (text, trained); a trained piece is an assistant content, eos follows it


def render_simple(messages) -> list[Piece]:
    pieces: list[Piece] = []
    for role, content in messages:
        if role == "assistant":
            pieces += [(SIMPLE_HEADERS[role], False), (content, True)]
        else:
            pieces.append((SIMPLE_HEADERS[role] + content + "\n", False))
    return pieces


class JinjaTemplate:
    """A chat template rendered in jinja2's sandbox, cut at sentinel-marked assistant contents."""

    _SENTINEL = "\x00ljx-assistant-{}\x00"

    def __init__(self, source: str):
        try:
            import jinja2
            import jinja2.sandbox
        except ImportError:
            raise ConfigError("data.sft.template=jinja needs the jinja2 package: pip install jinja2") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"data.sft.chat_template is not a valid Jinja template: {e}") from None
        self._errors = jinja2.exceptions.TemplateError

    def __call__(self, messages, where: str) -> list[Piece]:
        sentinels, rendered_messages = [], []
        for role, content in messages:
            if role == "assistant":
                sentinels.append((self._SENTINEL.format(len(sentinels)), content))
                content = sentinels[-1][0]
            rendered_messages.append({"role": role, "content": content})
        try:
            text = self._template.render(messages=rendered_messages, bos_token="", eos_token="",
                                         add_generation_prompt=False)
        except self._errors as e:
            raise DataError(f"{where}: data.sft.chat_template failed on this record: {e}") from None
        pieces: list[Piece] = []
        for sentinel, content in sentinels:
            if text.count(sentinel) != 1:
                raise DataError(
                    f"{where}: data.sft.chat_template wrote an assistant content {text.count(sentinel)} times; "
                    "it must write every assistant 'content' verbatim exactly once")
            before, text = text.split(sentinel)
            pieces += [(before, False), (content, True)]
        pieces.append((text, False))
        return [p for p in pieces if p[0]]


# ---------------------------------------------------------------- tokens


@dataclasses.dataclass
class Examples:
    """Tokenized records, concatenated: example i is tokens[starts[i]:ends[i]] with its columns."""

    tokens: np.ndarray
    weights: np.ndarray
    hops: np.ndarray  # the task bucket on trained tokens
    answer_ids: np.ndarray  # 1 on trained tokens: the whole response is one exact-match span
    starts: np.ndarray
    ends: np.ndarray
    dropped: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.starts)

    def example(self, index: int) -> dict[str, np.ndarray]:
        part = slice(self.starts[index], self.ends[index])
        return {"tokens": self.tokens[part], "weights": self.weights[part], "hops": self.hops[part],
                "answer_ids": self.answer_ids[part]}


def tokenize_records(records: list[Record], render, tokenizer, seq_len: int, overlong: str,
                     buckets: dict[str, int]) -> Examples:
    """Records -> documents [bos, ...] with eos after each response; samples longer than seq_len
    (after the input/target shift) are dropped, truncated or refused per `overlong`."""
    tokens, weights, starts, ends, bucket_of = [], [], [], [], []
    dropped = truncated = offset = 0
    for record in records:
        doc, trained = [tokenizer.bos_id], [0]
        for text, is_response in render(record.messages, record.where):
            ids = tokenizer.encode(text)
            doc += ids
            trained += [int(is_response)] * len(ids)
            if is_response:
                doc.append(tokenizer.eos_id)
                trained.append(1)
        if len(doc) - 1 > seq_len:
            if overlong == "error":
                raise DataError(
                    f"{record.where}: {len(doc)} tokens ({len(doc) - 1} after the input/target shift) do not fit "
                    f"data.seq_len={seq_len}; raise data.seq_len or set data.sft.overlong=drop or truncate")
            if overlong == "truncate":
                doc, trained = doc[:seq_len + 1], trained[:seq_len + 1]
            if overlong == "drop" or not any(trained[1:]):  # truncation left no response: dropped too
                dropped += 1
                continue
            truncated += 1
        tokens.append(np.asarray(doc, np.int32))
        weights.append(np.asarray(trained, np.int32))
        starts.append(offset)
        offset += len(doc)
        ends.append(offset)
        bucket_of.append(np.full(len(doc), buckets[record.task], np.int32))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32))
    weights_all = cat(weights)
    return Examples(tokens=cat(tokens), weights=weights_all, hops=cat(bucket_of) * weights_all,
                    answer_ids=weights_all.copy(), starts=np.asarray(starts, np.int64),
                    ends=np.asarray(ends, np.int64), dropped=dropped, truncated=truncated)


def task_buckets(records: list[Record], task_field: str) -> dict[str, int]:
    """Task name -> exact-match bucket 1, 2, ... in sorted name order; records without a task
    share the name "" (bucket 1 when no record has a task)."""
    names = sorted({r.task for r in records})
    if len(names) > MAX_TASKS:
        raise DataError(f"data.paths: {len(names)} distinct {task_field!r} values, more than the {MAX_TASKS} "
                        "exact-match buckets; set data.sft.task_field='' to score all records as one bucket")
    return {name: i for i, name in enumerate(names, start=1)}
