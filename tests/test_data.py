"""Tests of layerjax.data: tokenizers, the Depo task, text sources, the grain pipeline, metrics.

They check invariants (answers recomputed from the edges, targets are the next input inside a
document, exact resumption) rather than only that the code runs.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from layerjax.config import Config, ConfigError, DataConfig, DepoConfig
from layerjax.data import (ByteTokenizer, DataError, DepoTask, build_data, build_tokenizer,
                           exact_match_by_hops, merge_counts, read_documents, split_train_val)
from layerjax.data import depo

PAPER_LIKE = DepoConfig(min_nodes=100, max_nodes=375, num_cycles=1, max_hops=16, queries=8,
                        name_vocab=50, min_name_len=1, max_name_len=2)


def make_cfg(depo_cfg: DepoConfig | None = None, **data_fields) -> Config:
    cfg = Config()
    data = dataclasses.replace(cfg.data, **data_fields)
    if depo_cfg is not None:
        data = dataclasses.replace(data, depo=depo_cfg)
    return dataclasses.replace(cfg, data=data)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "Hello, wörld! ✓ 日本\n\ttabs"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    assert list(tok.encode_array(text)) == ids


def test_build_tokenizer_names_the_setting_for_a_missing_file(tmp_path):
    assert isinstance(build_tokenizer(DataConfig()), ByteTokenizer)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")))


def test_hf_tokenizer_wraps_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from layerjax.data import HFTokenizer

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    bpe.train_from_iterator(["the cat sat on the mat"] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    bpe.save(str(path))
    tok = build_tokenizer(DataConfig(tokenizer=str(path)))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == bpe.token_to_id("</s>")  # found among the specials
    base = bpe.get_vocab_size()
    assert tok.bos_id >= base and tok.pad_id >= base  # missing ones appended after the vocab
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3 and tok.vocab_size == base + 2
    ids = tok.encode("the cat sat")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "the cat sat"


# ---------------------------------------------------------------- Depo


def test_depo_is_deterministic_from_seed_and_index():
    task = DepoTask(DepoConfig())
    a, b = task.sample(7, seed=3), task.sample(7, seed=3)
    for key in ("tokens", "weights", "hops", "answer_ids"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["tokens"].dtype == np.int32 and a["weights"].dtype == np.float32
    others = [task.sample(8, seed=3), task.sample(7, seed=4), task.sample(7, seed=3, split="eval")]
    assert all(not np.array_equal(a["tokens"], o["tokens"]) for o in others)


def _check_depo_sample(task: DepoTask, sample: dict) -> None:
    """Every stored answer equals the one recomputed from the edges; labels sit on answers only."""
    c = task.cfg
    tokens = sample["tokens"]
    assert tokens[0] == task.bos_id and tokens[-1] == task.eos_id
    assert len(tokens) <= task.max_length and tokens.max() < task.vocab_size
    assert len({len(tokens)} | {len(sample[k]) for k in ("weights", "hops", "answer_ids")}) == 1
    solved = task.parse_and_solve(tokens)
    assert len(solved) == c.queries
    for answer_id, (k, answer) in enumerate(solved, start=1):
        span = sample["answer_ids"] == answer_id
        assert 1 <= k <= c.max_hops
        assert list(tokens[span]) == answer + [depo.SEP]  # the name and its closing ";"
        assert np.all(sample["hops"][span] == k)
        at = np.flatnonzero(span)
        assert np.all(np.diff(at) == 1)  # one contiguous span
    # weights are exactly 1 on answer tokens and 0 elsewhere
    np.testing.assert_array_equal(sample["weights"], (sample["answer_ids"] > 0).astype(np.float32))
    np.testing.assert_array_equal(sample["hops"] > 0, sample["answer_ids"] > 0)
    # the edges form disjoint cycles over distinct names of allowed lengths
    text = task.decode(tokens)
    edges = [clause.split(" -> ") for clause in text.split(" ; ") if " -> " in clause]
    edges[0][0] = edges[0][0].removeprefix("<bos> ")
    sources, targets = [e[0] for e in edges], [e[1] for e in edges]
    assert len(set(sources)) == len(sources) and set(sources) == set(targets)
    assert c.num_cycles * c.min_nodes <= len(sources) <= c.num_cycles * c.max_nodes
    assert all(c.min_name_len <= len(name.split(".")) <= c.max_name_len for name in sources)
    asked = [clause.split(" ")[1] for clause in text.split(" ; ") if clause.startswith("? ")]
    assert len(asked) == c.queries and set(asked) <= set(sources)
    assert len(set(asked)) == min(len(asked), len(sources))  # distinct query nodes


@pytest.mark.parametrize("depo_cfg, num_samples", [
    (DepoConfig(), 200),
    (DepoConfig(min_nodes=3, max_nodes=12, num_cycles=3, max_hops=8, queries=5), 60),
    (DepoConfig(min_nodes=2, max_nodes=2, max_hops=5, queries=3, name_vocab=3, max_name_len=3), 60),
    (DepoConfig(min_nodes=20, max_nodes=40, num_cycles=2, queries=10, name_vocab=4,
                min_name_len=1, max_name_len=4), 30),  # few short names: exercises the exact path
    (PAPER_LIKE, 12),
    (dataclasses.replace(PAPER_LIKE, min_nodes=40, max_nodes=100, num_cycles=3, name_vocab=400,
                         max_name_len=3), 8),
], ids=["default", "multi-cycle", "tiny-cycles", "scarce-names", "paper-like", "paper-3-cycles"])
def test_depo_answers_match_an_independent_solver(depo_cfg, num_samples):
    task = DepoTask(depo_cfg)
    for index in range(num_samples):
        _check_depo_sample(task, task.sample(index, seed=11))


def test_depo_token_layout_and_decode():
    cfg = DepoConfig(max_hops=4, name_vocab=32)
    task = DepoTask(cfg)
    assert (task.pad_id, task.bos_id, task.eos_id) == (0, 1, 2)
    assert task.name_base == 7 + 4 and task.vocab_size == 7 + 4 + 32
    ids = [depo.BOS, 11, 12, depo.ARROW, 13, depo.SEP, 13, depo.ARROW, 11, 12, depo.SEP,
           depo.QUERY, 13, depo.HOP_BASE + 2, depo.ANSWER, 11, 12, depo.SEP, depo.EOS]
    assert task.decode(ids) == "<bos> n0.n1 -> n2 ; n2 -> n0.n1 ; ? n2 k=3 => n0.n1 ; <eos>"
    assert task.parse_and_solve(ids) == [(3, [11, 12])]  # around the 2-cycle and one more step


def test_depo_sample_longer_than_seq_len_is_a_clear_error():
    cfg = make_cfg(DepoConfig(min_nodes=30, max_nodes=40), seq_len=64)
    with pytest.raises(ConfigError, match=r"data\.seq_len=64.*longest data.source='depo' sample"):
        build_data(cfg)


def test_depo_config_without_enough_names_is_rejected():
    with pytest.raises(ConfigError, match="name_vocab"):
        DepoTask(DepoConfig(min_nodes=10, max_nodes=10, name_vocab=3, max_name_len=1))


# ---------------------------------------------------------------- batches


def _check_batch(batch: dict, cfg: Config, data) -> None:
    rows, length = cfg.data.batch_size, cfg.data.seq_len
    dtypes = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
              "segment_ids": np.int32, "positions": np.int32, "hops": np.int32, "answer_ids": np.int32}
    assert set(batch) == set(dtypes)
    for key, dtype in dtypes.items():
        assert batch[key].shape == (rows, length) and batch[key].dtype == dtype, key
    seg, pos = batch["segment_ids"], batch["positions"]
    padding = seg == 0
    assert np.all(batch["weights"][padding] == 0) and np.all(batch["answer_ids"][padding] == 0)
    assert np.all(batch["inputs"][padding] == data.pad_id)
    assert np.all(batch["inputs"] < data.vocab_size) and np.all(batch["targets"] < data.vocab_size)
    # padding only at the end of a row; segments numbered 1, 2, ... in order
    assert np.all(np.diff(padding.astype(int), axis=1) >= 0)
    assert np.all(np.diff(seg, axis=1)[~padding[:, 1:]] >= 0)
    assert np.all(seg[:, 0] == 1)
    # positions restart exactly where a segment starts and count up inside it
    starts = np.concatenate([np.ones((rows, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1) & ~padding
    assert np.all((pos == 0)[~padding] == starts[~padding])
    same = (seg[:, 1:] == seg[:, :-1]) & ~padding[:, 1:]
    assert np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1)
    # inside a segment, the target of t is the input of t+1
    assert np.all(batch["targets"][:, :-1][same] == batch["inputs"][:, 1:][same])


def _documents(batch: dict, data) -> set[str]:
    """The decoded documents (segments) of a batch."""
    found = set()
    for row in range(len(batch["inputs"])):
        for s in range(1, batch["segment_ids"][row].max() + 1):
            at = batch["segment_ids"][row] == s
            found.add(data.decode(np.r_[batch["inputs"][row][at], batch["targets"][row][at][-1:]]))
    return found


def test_depo_batches_are_well_formed_and_answers_recoverable():
    cfg = make_cfg(batch_size=8, seq_len=96)
    data = build_data(cfg)
    assert data.vocab_size == DepoTask(cfg.data.depo).vocab_size
    batch = next(data.train_iterator())
    _check_batch(batch, cfg, data)
    # Depo: loss only on answer targets; each segment is a whole sample, starting at bos.
    np.testing.assert_array_equal(batch["weights"] > 0, batch["answer_ids"] > 0)
    np.testing.assert_array_equal(batch["hops"] > 0, batch["answer_ids"] > 0)
    task = DepoTask(cfg.data.depo)
    segments = 0
    for row in range(cfg.data.batch_size):
        for s in range(1, batch["segment_ids"][row].max() + 1):
            at = batch["segment_ids"][row] == s
            doc = np.r_[batch["inputs"][row][at][:1], batch["targets"][row][at]]
            assert doc[0] == task.bos_id and doc[-1] == task.eos_id
            for answer_id, (k, answer) in enumerate(task.parse_and_solve(doc), start=1):
                span = at & (batch["answer_ids"][row] == answer_id)
                assert list(batch["targets"][row][span]) == answer + [depo.SEP]
                assert np.all(batch["hops"][row][span] == k)
            segments += 1
    assert segments > cfg.data.batch_size  # several short samples share each row


def test_synthetic_random_batches_fill_every_row():
    cfg = make_cfg(source="synthetic_random", batch_size=4, seq_len=32, synthetic_vocab=100)
    data = build_data(cfg)
    batch = next(data.train_iterator())
    _check_batch(batch, cfg, data)
    assert np.all(batch["segment_ids"] == 1) and np.all(batch["weights"] == 1)
    assert batch["inputs"].max() < 100 and data.vocab_size == 100
    assert not np.array_equal(batch["inputs"], data.eval_batches()[0]["inputs"])  # another stream


@pytest.mark.parametrize("source", ["depo", "text"])
def test_iterator_state_resumes_to_identical_batches(source, tmp_path):
    if source == "text":  # a small corpus, so several epochs (and reshuffles) pass
        path = tmp_path / "corpus.txt"
        path.write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(60)))
        cfg = make_cfg(source="text", paths=(str(path),), batch_size=4, seq_len=48)
    else:
        cfg = make_cfg(batch_size=4, seq_len=64)
    data = build_data(cfg)
    iterator = data.train_iterator()
    for _ in range(3):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
    expected = [next(iterator) for _ in range(12)]
    restored = build_data(cfg).train_iterator()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_processes_get_half_the_batch_and_different_data():
    cfg = make_cfg(batch_size=8)
    first, second = build_data(cfg, 0, 2), build_data(cfg, 1, 2)
    assert first.local_batch_size == second.local_batch_size == 4
    a, b = next(first.train_iterator()), next(second.train_iterator())
    assert a["inputs"].shape == (4, cfg.data.seq_len)
    assert not _documents(a, first) & _documents(b, second)
    assert not _documents(first.eval_batches()[0], first) & _documents(second.eval_batches()[0], second)
    with pytest.raises(ConfigError, match="data.batch_size"):
        build_data(make_cfg(batch_size=6), 0, 4)


def test_text_processes_read_disjoint_documents(tmp_path):
    path = tmp_path / "docs.jsonl"  # one document per row, as above
    path.write_text("\n".join(json.dumps({"text": f"document {i:05d}."}) for i in range(20)))
    cfg = make_cfg(source="text", paths=(str(path),), batch_size=4, seq_len=16, val_fraction=0.0)
    seen = []
    for process in range(2):
        data = build_data(cfg, process, 2)
        iterator = data.train_iterator()
        seen.append({int(data.decode(row)[9:14]) for _ in range(10) for row in next(iterator)["inputs"]})
    assert seen[0] | seen[1] == set(range(20)) and not seen[0] & seen[1]


def test_eval_batches_are_fixed_and_held_out():
    cfg = make_cfg(batch_size=4, num_eval_batches=3)
    data = build_data(cfg)
    evals = data.eval_batches()
    assert len(evals) == 3
    again = build_data(cfg).eval_batches()
    for a, b in zip(evals, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    iterator = data.train_iterator()
    train = set().union(*(_documents(next(iterator), data) for _ in range(5)))
    held_out = set().union(*(_documents(batch, data) for batch in evals))
    assert len(held_out) > 3 * 4 and not train & held_out


def test_model_vocab_smaller_than_data_vocab_is_rejected():
    cfg = make_cfg()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=10))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_data(cfg)


# ---------------------------------------------------------------- text sources


def test_text_source_without_paths_is_rejected_when_data_is_built():
    # The config alone is valid (an imported model's config.toml names no corpus yet, and sampling
    # needs none); building the data is where a missing corpus must be named.
    cfg = make_cfg(source="text")
    with pytest.raises(ConfigError, match="data.source='text' needs data.paths"):
        build_data(cfg)


@pytest.mark.parametrize("name, content, error, message", [
    ("missing.txt", None, ConfigError, r"data\.paths: .*missing\.txt does not exist"),
    ("empty.txt", b"", DataError, r"empty\.txt: file is empty"),
    ("empty.jsonl", b"\n\n", DataError, r"empty\.jsonl: file is empty"),
    ("bad_utf8.txt", b"fine\nfine\n\xff\xfe broken\n", DataError, r"bad_utf8\.txt:3: not valid UTF-8"),
    ("bad_utf8.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', DataError,
     r"bad_utf8\.jsonl:2: not valid UTF-8"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', DataError,
     r"bad\.jsonl:3: not valid JSON"),
    ("no_field.jsonl", b'{"body": "a"}\n', DataError, r"no_field\.jsonl:1: no 'text' field"),
    ("corpus.csv", b"a,b\n", ConfigError,
     r"corpus\.csv has unsupported extension.*\.txt, \.jsonl, \.parquet"),
    ("broken.parquet", b"not parquet", DataError, r"broken\.parquet: not a readable parquet file"),
])
def test_text_errors_name_the_file(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        read_documents([str(path)])
    with pytest.raises(error, match=message):  # the same error through the pipeline
        build_data(make_cfg(source="text", paths=(str(path),)))


def test_jsonl_and_parquet_documents_build_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i} says hello" for i in range(40)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": t, "id": i}) for i, t in enumerate(texts)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": texts}), parquet)
    for path in (jsonl, parquet):
        assert read_documents([str(path)], text_field="content") == texts
        cfg = make_cfg(source="text", paths=(str(path),), text_field="content", batch_size=4,
                       seq_len=64, val_fraction=0.1)
        data = build_data(cfg)
        batch = next(data.train_iterator())
        _check_batch(batch, cfg, data)
        assert np.all(batch["weights"][batch["segment_ids"] > 0] == 1)
        row = batch["segment_ids"][0] == 1
        decoded = data.decode(np.r_[batch["inputs"][0][row], batch["targets"][0][row][-1:]])
        assert decoded in texts[:36]  # a whole training document (the last 4 are held out)
        held_out = {data.decode(r) for r in data.eval_batches()[0]["targets"]}
        assert any(texts[-1] in h for h in held_out) and not any(texts[0] in h for h in held_out)


def test_text_documents_are_shuffled_and_reshuffled_every_epoch(tmp_path):
    from layerjax.data.pipeline import _text_source

    # Each document fills one row exactly (15 bytes + bos + eos = seq_len + 1).
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i:05d}."}) for i in range(20)))
    cfg = make_cfg(source="text", paths=(str(path),), batch_size=2, seq_len=16, val_fraction=0.0)
    # The document stream before packing: a new permutation every epoch, never file order.
    stream = _text_source(cfg, 0, 1).train
    doc_of = lambda example: int(bytes(example["columns"][1:15, 0].astype(np.uint8))[9:14])  # noqa: E731
    first_epoch = [doc_of(stream[i]) for i in range(20)]
    second_epoch = [doc_of(stream[i]) for i in range(20, 40)]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(20))
    assert first_epoch != second_epoch and first_epoch != list(range(20))
    # Through packing and batching, every document still comes equally often.
    data = build_data(cfg)
    iterator = data.train_iterator()
    seen = [int(data.decode(row)[9:14]) for _ in range(100) for row in next(iterator)["inputs"]]
    assert np.bincount(seen, minlength=20).min() >= 9 and np.bincount(seen).max() <= 11


def test_split_train_val():
    train, val = split_train_val(["abcdefghij"], 0.2)
    assert train == ["abcdefgh"] and val == ["ij"]
    docs = [str(i) for i in range(10)]
    train, val = split_train_val(docs, 0.2)
    assert train == docs[:8] and val == docs[8:]
    assert split_train_val(docs, 0.0) == (docs, [])
    assert split_train_val(["a", "b"], 0.01) == (["a"], ["b"])  # at least one held-out document


def test_long_text_is_chunked_without_losing_a_target(tmp_path):
    letters = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, 1000)
    path = tmp_path / "long.txt"
    path.write_text("".join(map(chr, letters)))
    cfg = make_cfg(source="text", paths=(str(path),), batch_size=2, seq_len=100, val_fraction=0.0)
    data = build_data(cfg)
    assert data.eval_batches() == []
    document = np.r_[257, letters, 258]  # bos, bytes, eos: 1001 targets in 11 chunks
    chunks = set()
    iterator = data.train_iterator()
    for _ in range(8):  # more than one epoch of 11 chunks
        batch = next(iterator)
        _check_batch(batch, cfg, data)
        for row in range(2):
            for s in range(1, batch["segment_ids"][row].max() + 1):
                at = batch["segment_ids"][row] == s
                inputs, targets = batch["inputs"][row][at], batch["targets"][row][at]
                # where in the document this chunk sits (inputs and targets both must match)
                start = next(o for o in range(len(document) - len(inputs)) if np.array_equal(
                    document[o:o + len(inputs) + 1], np.r_[inputs, targets[-1:]])
                    and np.array_equal(document[o + 1:o + 1 + len(targets)], targets))
                chunks.add((start, len(inputs)))
    # the chunks seen tile the document: every token is a target exactly once per epoch
    ordered = sorted(chunks)
    assert ordered[0][0] == 0 and sum(n for _, n in ordered) == len(document) - 1
    assert all(s + n == s_next for (s, n), (s_next, _) in zip(ordered, ordered[1:]))
    assert max(n for _, n in ordered) == cfg.data.seq_len


def test_tinyshakespeare_builds_batches(shared_data):  # the fixture skips when ../shared is absent
    path = shared_data / "tinyshakespeare.txt"
    cfg = make_cfg(source="text", paths=(str(path),), batch_size=8, seq_len=128, num_eval_batches=2)
    data = build_data(cfg)
    assert data.vocab_size == 259
    batch = next(data.train_iterator())
    _check_batch(batch, cfg, data)
    corpus = path.read_text()
    cut = int(round(len(corpus) * (1 - cfg.data.val_fraction)))
    piece = data.decode(batch["targets"][0][batch["segment_ids"][0] == 1])
    assert len(piece) > 60 and piece.strip("\ufffd")[:60] in corpus[:cut + 1]
    evals = data.eval_batches()
    assert len(evals) == 2
    assert data.decode(evals[0]["targets"][0][:60]).strip("\ufffd") in corpus[cut:]


# ---------------------------------------------------------------- metrics


def test_exact_match_by_hops_counts_whole_answer_spans():
    # Row 0 packs two documents, both with an answer id 1 (k=2 and k=3); row 1 has ids 1 (k=2)
    # and 2 (k=1). Targets below; predictions differ at one token of row 0's second answer.
    targets = np.array([[5, 9, 9, 4, 0, 7, 7, 4, 0],
                        [6, 8, 4, 3, 3, 8, 4, 0, 0]])
    answer_ids = np.array([[0, 1, 1, 1, 0, 1, 1, 1, 0],
                           [0, 1, 1, 0, 0, 2, 2, 0, 0]])
    hops = np.array([[0, 2, 2, 2, 0, 3, 3, 3, 0],
                     [0, 2, 2, 0, 0, 1, 1, 0, 0]])
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0],
                            [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    batch = {"targets": targets, "answer_ids": answer_ids, "hops": hops, "segment_ids": segment_ids}
    predictions = targets.copy()
    predictions[0, 6] = 1  # wrong token inside the k=3 answer
    predictions[1, 0] = 1  # wrong token outside any answer: does not count
    counts = exact_match_by_hops(predictions, batch)
    assert counts == {1: (1, 1), 2: (2, 2), 3: (0, 1)}
    assert exact_match_by_hops(predictions, {**batch, "answer_ids": np.zeros_like(answer_ids)}) == {}
    assert merge_counts(counts, {2: (0, 3), 4: (1, 1)}) == {1: (1, 1), 2: (2, 5), 3: (0, 1), 4: (1, 1)}


def test_depo_chance_accuracy_matches_simulation():
    from layerjax.data.depo import DepoTask

    cfg = DepoConfig(min_nodes=3, max_nodes=7, num_cycles=2)
    rng = np.random.default_rng(0)
    simulated = np.mean([1.0 / rng.integers(3, 8, size=2).sum() for _ in range(20000)])
    assert DepoTask(cfg).chance_accuracy == pytest.approx(simulated, rel=0.01)
    assert DepoTask(DepoConfig(min_nodes=4, max_nodes=4)).chance_accuracy == pytest.approx(0.25)
