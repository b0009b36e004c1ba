"""One grain pipeline for every data source: documents -> packed rows -> batches for this process.

Each source only says how to turn an index into a document (a Depo sample, a random row, a chunk
of text). Everything after that is shared:

    MapDataset of indices -> shard by process -> (shuffle, repeat) -> document example
      -> to_iter_dataset -> FirstFitPack into rows of seq_len -> batch -> named arrays

A document [bos, t1, ..., eos] becomes inputs = doc[:-1] and targets = doc[1:] *before* packing,
so no token is ever asked to predict the first token of the next document in its row. The five
per-token values travel as one int32 [n, 5] array: grain's packer works per feature in Python,
and one feature instead of five makes packing ~30% faster. Loss weights are therefore 0/1
integers until the last step, where they become float32.

Everything runs in the caller's thread. JAX dispatches a train step asynchronously, so the next
batch is built while the previous step computes; a background prefetch thread would add little on
a 2-core machine, and grain's thread prefetcher aborts the interpreter when an iterator is still
alive at exit.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
import warnings

import grain
import numpy as np

from layerjax.config import Config, ConfigError
from layerjax.data import brevo, sft
from layerjax.data.depo import DepoTask
from layerjax.data.metrics import exact_match_by_hops
from layerjax.data.mano import ManoTask
from layerjax.data.recall import RecallTask
from layerjax.data.seeding import STREAMS, keyed_generator
from layerjax.data.sources import DataError, read_documents, split_train_val
from layerjax.data.tokenizers import build_tokenizer

COLUMNS = ("inputs", "targets", "weights", "hops", "answer_ids")
_UNBOUNDED = 2**62  # index space of generated sources: never exhausted in practice


@dataclasses.dataclass
class Data:
    """The data side of a run: vocabulary facts, a resumable train iterator, fixed eval batches."""

    vocab_size: int
    pad_id: int
    bos_id: int | None  # None where the source has no such token (synthetic_random)
    eos_id: int | None
    seq_len: int
    local_batch_size: int
    summary: str  # one line for logs and dry runs
    chance_accuracy: float | None  # tasks with answers: exact match of a random guess
    score: typing.Callable  # (predictions [B, L], batch) -> {bucket: (correct, total)}
    _decode: typing.Callable[[typing.Sequence[int]], str]
    _train: grain.IterDataset
    _eval: grain.IterDataset | None
    _num_eval_batches: int
    _eval_cache: list | None = None
    buckets: dict[int, str] | None = None  # names of the exact-match buckets, where they have names

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in np.asarray(ids).ravel()])

    def train_iterator(self) -> grain.DatasetIterator:
        """An endless iterator of this process's batches; get_state()/set_state() resume exactly."""
        return iter(self._train)

    def eval_batches(self) -> list[dict[str, np.ndarray]]:
        """`data.num_eval_batches` held-out batches, the same on every call (empty: no val data)."""
        if self._eval_cache is None:
            if self._eval is None:
                self._eval_cache = []
            else:
                self._eval_cache = list(itertools.islice(iter(self._eval), self._num_eval_batches))
        return self._eval_cache


# ---------------------------------------------------------------- documents as examples


def document_example(tokens: np.ndarray, weights=None, hops=None, answer_ids=None) -> dict:
    """A document as the packer's one feature: int32 [n-1, 5] of (input, target, weight, hops,
    answer id), the last three read at the target position. weights=None means every target."""
    columns = np.zeros((len(tokens) - 1, len(COLUMNS)), np.int32)
    columns[:, 0] = tokens[:-1]
    columns[:, 1] = tokens[1:]
    columns[:, 2] = 1 if weights is None else weights[1:]
    if hops is not None:
        columns[:, 3] = hops[1:]
    if answer_ids is not None:
        columns[:, 4] = answer_ids[1:]
    return {"columns": columns}


class _RandomExamples:
    """index -> one row of uniform random tokens, exactly filling a row after the shift."""

    def __init__(self, vocab: int, seq_len: int, seed: int, split: str):
        self.vocab, self.length, self.seed, self.stream = vocab, seq_len + 1, seed, STREAMS[split]

    def __call__(self, index: int) -> dict:
        rng = keyed_generator(self.seed, self.stream, index)
        return document_example(rng.integers(0, self.vocab, self.length, dtype=np.int32))


class _TextChunks:
    """Tokenized documents cut into chunks of at most seq_len+1 tokens, each chunk one example.

    Chunks tile a document with one token of overlap, so every token is a target exactly once.
    Each chunk is its own segment (positions restart at 0) because attention never sees the
    previous chunk anyway; short last chunks share rows through packing.
    """

    def __init__(self, documents: list[str], tokenizer, seq_len: int):
        pieces, starts, ends, offset = [], [], [], 0
        for text in documents:
            tokens = np.r_[tokenizer.bos_id, tokenizer.encode_array(text), tokenizer.eos_id]
            chunk_starts = np.arange(0, len(tokens) - 1, seq_len)
            starts.append(offset + chunk_starts)
            ends.append(offset + np.minimum(chunk_starts + seq_len + 1, len(tokens)))
            pieces.append(tokens.astype(np.int32))
            offset += len(tokens)
        self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __call__(self, index: int) -> dict:
        return document_example(self.tokens[self.starts[index]:self.ends[index]])


# ---------------------------------------------------------------- sources


@dataclasses.dataclass
class _Source:
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    decode: typing.Callable
    train: grain.MapDataset  # examples, already sharded for this process, endless
    eval: grain.MapDataset | None
    summary: str
    chance_accuracy: float | None = None  # exact match of guessing, for tasks with answers
    score: typing.Callable = exact_match_by_hops  # (predictions, batch) -> {bucket: (correct, total)}
    buckets: dict[int, str] | None = None  # bucket -> name (sft: task names)


def _unbounded(process_index: int, process_count: int) -> grain.MapDataset:
    """Global indices of generated samples; process p takes p, p+P, p+2P, ..."""
    return grain.MapDataset.range(_UNBOUNDED)[process_index::process_count]


class _TaskExamples:
    """index -> packed-ready document of a generated task (a class, not a lambda, so it pickles)."""

    def __init__(self, task, seed: int, split: str):
        self.task, self.seed, self.split = task, seed, split

    def __call__(self, index: int) -> dict:
        return document_example(**self.task.sample(index, self.seed, self.split))


def _task_source(task, cfg: Config, process_index: int, process_count: int, summary: str,
                 score: typing.Callable = exact_match_by_hops) -> _Source:
    """A generated task (Depo, Mano, recall): i.i.d. samples by index, so the stream needs no
    shuffle and never repeats; held-out samples come from a separate seed stream."""
    longest = task.max_length - 1  # tokens per example after the input/target shift
    if longest > cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is too short for the longest data.source={cfg.data.source!r} "
            f"sample: {task.max_length} tokens ({longest} after the input/target shift). Raise data.seq_len "
            f"to at least {longest} or make the samples smaller (data.{cfg.data.source}.*)")
    indices = _unbounded(process_index, process_count)
    return _Source(
        vocab_size=task.vocab_size, pad_id=task.pad_id, bos_id=task.bos_id, eos_id=task.eos_id,
        decode=task.decode, chance_accuracy=task.chance_accuracy,
        train=indices.map(_TaskExamples(task, cfg.data.seed, "train")),
        eval=indices.map(_TaskExamples(task, cfg.data.seed, "eval")),
        summary=summary, score=score)


def _depo_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    task, d = DepoTask(cfg.data.depo), cfg.data.depo
    return _task_source(task, cfg, process_index, process_count,
                        f"depo: vocab {task.vocab_size}, cycles x{d.num_cycles} of {d.min_nodes}-{d.max_nodes} "
                        f"nodes, k in 1..{d.max_hops}, queries x{d.queries}, "
                        f"samples ~{task.typical_length:.0f} tokens (max {task.max_length})")


def _brevo_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    task, c = brevo.BrevoTask(cfg.data.brevo), cfg.data.brevo
    return _task_source(task, cfg, process_index, process_count,
                        f"brevo: vocab {task.vocab_size}, DAGs of {c.min_nodes}-{c.max_nodes} nodes, degree <= "
                        f"{c.max_degree}", score=brevo.score)


def _mano_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    task, c = ManoTask(cfg.data.mano), cfg.data.mano
    return _task_source(task, cfg, process_index, process_count,
                        f"mano: vocab {task.vocab_size}, {c.min_ops}-{c.max_ops} operations mod {c.modulus}")


def _recall_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    task, c = RecallTask(cfg.data.recall), cfg.data.recall
    return _task_source(task, cfg, process_index, process_count,
                        f"recall: vocab {task.vocab_size}, {c.pairs} pairs, {c.queries} queries")


def _random_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    vocab = cfg.data.synthetic_vocab
    if vocab < 1:
        raise ConfigError(f"data.synthetic_vocab={vocab} must be at least 1")
    indices = _unbounded(process_index, process_count)
    return _Source(
        vocab_size=vocab, pad_id=0, bos_id=None, eos_id=None,
        decode=lambda ids: " ".join(str(i) for i in ids),
        train=indices.map(_RandomExamples(vocab, cfg.data.seq_len, cfg.data.seed, "train")),
        eval=indices.map(_RandomExamples(vocab, cfg.data.seq_len, cfg.data.seed, "eval")),
        summary=f"synthetic_random: uniform tokens in [0, {vocab}), one document per row",
    )


def _text_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    if not cfg.data.paths:
        raise ConfigError("data.source='text' needs data.paths, e.g. data.paths=corpus.txt")
    tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size)
    documents = read_documents(cfg.data.paths, cfg.data.text_field)
    train_docs, val_docs = split_train_val(documents, cfg.data.val_fraction)
    train_chunks = _TextChunks(train_docs, tokenizer, cfg.data.seq_len)
    val_chunks = _TextChunks(val_docs, tokenizer, cfg.data.seq_len)
    if len(train_chunks) < process_count:
        raise DataError(f"data.paths: only {len(train_chunks)} training chunks for {process_count} "
                        "processes; use more text or fewer processes")
    # Shard, then shuffle: each process reads its own part, reshuffled every epoch (grain seeds
    # epoch e with seed + e).
    train = (grain.MapDataset.range(len(train_chunks))[process_index::process_count]
             .shuffle(seed=cfg.data.seed).repeat().map(train_chunks))
    evaluation = None
    if len(val_chunks):
        val_indices = grain.MapDataset.range(len(val_chunks))
        if len(val_chunks) >= process_count:  # tiny validation sets are read whole by everyone
            val_indices = val_indices[process_index::process_count]
        evaluation = val_indices.repeat().map(val_chunks)
    num_tokens = len(train_chunks.tokens) + len(val_chunks.tokens)
    return _Source(
        vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id, decode=tokenizer.decode, train=train, eval=evaluation,
        summary=(f"text: {len(documents)} document(s), {num_tokens} tokens, "
                 f"{len(train_chunks)} train / {len(val_chunks)} val chunks, "
                 f"vocab {tokenizer.vocab_size}"),
    )


class _SFTDocuments:
    """index -> one tokenized SFT record (a class, not a lambda, so it pickles)."""

    def __init__(self, examples: sft.Examples):
        self.examples = examples

    def __call__(self, index: int) -> dict:
        return document_example(**self.examples.example(index))


def _sft_source(cfg: Config, process_index: int, process_count: int) -> _Source:
    """Prompt/response or chat records (layerjax/data/sft.py): each record is one document, loss on
    the responses only, exact match of the whole response per task. Held out like text."""
    d = cfg.data
    if not d.paths:
        raise ConfigError("data.source='sft' needs data.paths, e.g. data.paths=train.jsonl "
                          "(python3 tools/make_sft_data.py writes one)")
    tokenizer = build_tokenizer(d, cfg.model.vocab_size)
    render = sft.JinjaTemplate(d.sft.chat_template) if d.sft.template == "jinja" else (
        lambda messages, where: sft.render_simple(messages))
    records = sft.read_records(d.paths, d.sft)
    buckets = sft.task_buckets(records, d.sft.task_field)
    train_records, val_records = sft.split_records(records, d.val_fraction)
    train_examples, val_examples = (sft.tokenize_records(part, render, tokenizer, d.seq_len, d.sft.overlong, buckets)
                                    for part in (train_records, val_records))
    dropped = train_examples.dropped + val_examples.dropped
    truncated = train_examples.truncated + val_examples.truncated
    overlong = f"{dropped} dropped, {truncated} truncated as longer than data.seq_len={d.seq_len}"
    if dropped or truncated:
        warnings.warn(f"data.source=sft: {overlong} (data.sft.overlong={d.sft.overlong!r})", stacklevel=2)
    if len(train_examples) < process_count:
        raise DataError(f"data.paths: only {len(train_examples)} training records for {process_count} process(es) "
                        f"({len(train_records)} read, {overlong}); use more records, a longer data.seq_len "
                        "or data.sft.overlong=truncate")
    train = (grain.MapDataset.range(len(train_examples))[process_index::process_count]
             .shuffle(seed=d.seed).repeat().map(_SFTDocuments(train_examples)))
    evaluation = None
    if len(val_examples):
        val_indices = grain.MapDataset.range(len(val_examples))
        if len(val_examples) >= process_count:  # tiny validation sets are read whole by everyone
            val_indices = val_indices[process_index::process_count]
        evaluation = val_indices.repeat().map(_SFTDocuments(val_examples))
    names = {bucket: name or "(no task)" for name, bucket in buckets.items()}
    shown = ", ".join(f"k{bucket}={name}" for bucket, name in sorted(names.items()))
    return _Source(
        vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id, decode=tokenizer.decode, train=train, eval=evaluation, buckets=names,
        summary=(f"sft: {len(records)} records ({len(train_examples)} train / {len(val_examples)} val examples, "
                 f"{overlong}), template {d.sft.template}, {len(train_examples.tokens) + len(val_examples.tokens)} "
                 f"tokens, {int(train_examples.weights.sum() + val_examples.weights.sum())} trained, "
                 f"vocab {tokenizer.vocab_size}; exact-match buckets {shown}"),
    )


_SOURCES = {"depo": _depo_source, "brevo": _brevo_source, "mano": _mano_source, "recall": _recall_source,
            "synthetic_random": _random_source, "text": _text_source, "sft": _sft_source}


# ---------------------------------------------------------------- packing and batching


class _NamedBatch:
    """Packed [B, L, 5] columns -> the named arrays of the batch format."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, packed: dict) -> dict[str, np.ndarray]:
        segment_ids = packed["columns_segment_ids"]
        by_column = np.ascontiguousarray(np.moveaxis(packed["columns"], -1, 0))  # [5, B, L]
        padding = segment_ids == 0
        return {
            "inputs": np.where(padding, self.pad_id, by_column[0]).astype(np.int32),
            "targets": np.where(padding, self.pad_id, by_column[1]).astype(np.int32),
            "weights": by_column[2].astype(np.float32),
            "segment_ids": segment_ids.astype(np.int32),
            "positions": packed["columns_positions"].astype(np.int32),
            "hops": by_column[3],
            "answer_ids": by_column[4],
        }


def _batched(examples: grain.MapDataset, *, seq_len: int, batch: int, seed: int, pad_id: int,
             shuffle_rows: bool) -> grain.IterDataset:
    # No reader threads: examples are computed in memory, and threads would only fight over the GIL.
    stream = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    # Four batches' worth of open rows: short documents find a gap more often (Depo rows go from
    # 92.5% to 93% full at the default size, from 80% to 84% with 375-node cycles).
    packed = grain.experimental.FirstFitPackIterDataset(
        stream, length_struct={"columns": seq_len}, num_packing_bins=4 * batch, seed=seed,
        shuffle_bins=shuffle_rows)
    return packed.batch(batch, drop_remainder=True).map(_NamedBatch(pad_id))


def build_data(cfg: Config, process_index: int = 0, process_count: int = 1) -> Data:
    """Builds the source named by `data.source` and the shared pipeline on top of it."""
    d = cfg.data
    if d.source not in _SOURCES:
        raise ConfigError(f"data.source={d.source!r} is not one of {list(_SOURCES)}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside 0..{process_count - 1}")
    if d.batch_size % process_count:
        raise ConfigError(f"data.batch_size={d.batch_size} must be divisible by the number of "
                          f"processes ({process_count}): each process loads an equal share")
    if not 0 <= d.seed < 2**32:
        raise ConfigError(f"data.seed={d.seed} must be in [0, 2**32)")
    local_batch = d.batch_size // process_count
    source = _SOURCES[d.source](cfg, process_index, process_count)
    if cfg.model.vocab_size and cfg.model.vocab_size < source.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({source.vocab_size} for data.source={d.source!r}); set model.vocab_size=0 to take it "
            "from the data")
    packing = dict(seq_len=d.seq_len, batch=local_batch, seed=d.seed, pad_id=source.pad_id)
    train = _batched(source.train, shuffle_rows=True, **packing)
    evaluation = None
    if source.eval is not None and d.num_eval_batches > 0:
        evaluation = _batched(source.eval, shuffle_rows=False, **packing)
    return Data(
        vocab_size=source.vocab_size, pad_id=source.pad_id, bos_id=source.bos_id,
        eos_id=source.eos_id, seq_len=d.seq_len, local_batch_size=local_batch,
        summary=source.summary, chance_accuracy=source.chance_accuracy, score=source.score, buckets=source.buckets,
        _decode=source.decode, _train=train, _eval=evaluation, _num_eval_batches=d.num_eval_batches)
