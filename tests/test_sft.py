"""Supervised fine-tuning data (data.source=sft): masks, templates, packing, errors, resume, the
generated instruction sets, and a tiny training run."""

import json
import re

import numpy as np
import pytest

from conftest import TINY_RUN
from layerjax.config import ConfigError, load_config
from layerjax.data import DataError, build_data, sft
from layerjax.data.sft_tasks import make_records
from layerjax.data.tokenizers import ByteTokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def sft_data(path, *overrides, seq_len=64, batch=2):
    cfg = load_config("default", ["data.source=sft", f"data.paths={path}", f"data.seq_len={seq_len}",
                                  f"model.max_seq_len={max(seq_len, 64)}", f"data.batch_size={batch}",
                                  "data.val_fraction=0", *overrides])
    return build_data(cfg)


def segments(batch):
    """Every packed document as (row, its columns), in row order."""
    for row in range(batch["segment_ids"].shape[0]):
        for seg in np.unique(batch["segment_ids"][row]):
            if seg:
                cols = np.flatnonzero(batch["segment_ids"][row] == seg)
                yield row, cols


def test_simple_template_weights_exactly_the_response_and_eos(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi there", "response": "Yo!"}])
    data = sft_data(path, batch=1)
    batch = next(data.train_iterator())
    byte = ByteTokenizer()
    prompt = "<|user|>\nHi there\n<|assistant|>\n"
    doc = [byte.bos_id, *prompt.encode(), *b"Yo!", byte.eos_id]
    n = len(doc) - 1
    np.testing.assert_array_equal(batch["inputs"][0, :n], doc[:-1])
    np.testing.assert_array_equal(batch["targets"][0, :n], doc[1:])
    expected = np.zeros(64, np.float32)
    expected[n - 4:n] = 1  # "Yo!" and eos, read at target positions
    np.testing.assert_array_equal(batch["weights"][0], expected)
    assert (batch["answer_ids"][0] > 0).sum() == 4 and set(batch["hops"][0][expected > 0]) == {1}


def test_chat_turns_train_only_assistant_contents(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                         {"role": "assistant", "content": "6"}]}
    assert sft.render_simple([(m["role"], m["content"]) for m in chat["messages"]]) == [
        ("<|system|>\nBe brief.\n", False), ("<|user|>\n2+2?\n", False), ("<|assistant|>\n", False), ("4", True),
        ("<|user|>\n3+3?\n", False), ("<|assistant|>\n", False), ("6", True)]
    batch = next(sft_data(write_jsonl(tmp_path / "c.jsonl", [chat]), batch=1, seq_len=128).train_iterator())
    trained = batch["targets"][0][batch["weights"][0] > 0]
    eos = ByteTokenizer.eos_id
    np.testing.assert_array_equal(trained, [ord("4"), eos, ord("6"), eos])
    # Both turns form one exact-match span: the document's answer id is 1 throughout.
    assert set(batch["answer_ids"][0][batch["weights"][0] > 0]) == {1}


def test_jinja_template_renders_and_cuts_at_assistant_contents(tmp_path):
    template = sft.JinjaTemplate(CHATML)
    messages = (("user", "Hi"), ("assistant", "Hello"))
    assert template(messages, "x:1") == [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
                                         ("Hello", True), ("<|im_end|>\n", False)]
    path = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    data = sft_data(path, "data.sft.template=jinja", f"data.sft.chat_template={CHATML}", batch=1, seq_len=128)
    batch = next(data.train_iterator())
    w = batch["weights"][0] > 0
    assert data.decode(batch["targets"][0][w]) == "Hello" and batch["targets"][0][w][-1] == ByteTokenizer.eos_id
    byte = ByteTokenizer()
    doc = [byte.bos_id, *b"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello", byte.eos_id, *b"<|im_end|>\n"]
    n = len(doc) - 1
    np.testing.assert_array_equal(batch["inputs"][0, :n], doc[:-1])
    np.testing.assert_array_equal(batch["targets"][0, :n], doc[1:])
    assert "template jinja" in data.summary
    # A template that drops (or repeats) the assistant content cannot be masked: a clear error.
    dropping = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"j\.jsonl:1: .*0 times"):
        sft_data(path, "data.sft.template=jinja", f"data.sft.chat_template={dropping}")
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        sft_data(path, "data.sft.template=jinja", "data.sft.chat_template={% for %}")
    with pytest.raises(DataError, match=r"j\.jsonl:1: .*failed on this record: no system"):
        sft_data(path, "data.sft.template=jinja",
                 "data.sft.chat_template={{ raise_exception('no system') }}{{ messages[1].content }}")
    # The sandbox refuses attribute games.
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        sft.JinjaTemplate("{{ ''.__class__.__mro__ }}")((("assistant", "x"),), "x:1")


def test_config_validation_names_the_setting():
    with pytest.raises(ConfigError, match="data.sft.chat_template"):
        load_config("default", ["data.sft.template=jinja"])
    with pytest.raises(ConfigError, match="data.sft.template=jinja"):
        load_config("default", ["data.sft.chat_template=x"])
    with pytest.raises(ConfigError, match="data.sft.overlong='cut' is not one of"):
        load_config("default", ["data.sft.overlong=cut"])
    with pytest.raises(ConfigError, match="distinct"):
        load_config("default", ["data.sft.response_field=prompt"])
    with pytest.raises(ConfigError, match="needs data.paths"):
        build_data(load_config("default", ["data.source=sft"]))
    # A multi-line chat template survives the run directory's config.toml.
    import tomllib

    from layerjax.config import config_from_dict, to_toml

    cfg = load_config("default", ["data.sft.template=jinja", f"data.sft.chat_template={CHATML}\t\"quoted\" \\ é"])
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_tokenizer_json_masks_and_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "[UNK]", "<|user|>", "<|assistant|>", "what", "is", "up", "nothing", "much"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "what is up", "response": "nothing much"}])
    data = sft_data(path, f"data.tokenizer={tmp_path / 'tokenizer.json'}", batch=1)
    batch = next(data.train_iterator())
    n = int((batch["segment_ids"][0] == 1).sum())
    ids = {w: i for i, w in enumerate(words)}
    assert list(batch["inputs"][0, :n]) == [ids[w] for w in "<s> <|user|> what is up <|assistant|> nothing much".split()]
    assert list(batch["targets"][0, :n]) == [ids[w] for w in "<|user|> what is up <|assistant|> nothing much </s>".split()]
    np.testing.assert_array_equal(batch["weights"][0, :n], [0, 0, 0, 0, 0, 1, 1, 1])
    assert data.eos_id == ids["</s>"] and data.pad_id == ids["<pad>"]


def test_packing_keeps_examples_whole_with_own_segments_and_positions(tmp_path):
    records = [{"prompt": "q" * (3 + i % 7), "response": "a" * (1 + i % 5)} for i in range(40)]
    data = sft_data(write_jsonl(tmp_path / "p.jsonl", records), seq_len=64, batch=2)
    iterator = data.train_iterator()
    byte = ByteTokenizer()
    docs_per_row = []
    for _ in range(3):
        batch = next(iterator)
        rows = {}
        for row, cols in segments(batch):
            assert np.all(np.diff(cols) == 1), "a document is contiguous in its row"
            np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(len(cols)))
            inputs, targets, weights = (batch[k][row, cols] for k in ("inputs", "targets", "weights"))
            assert inputs[0] == byte.bos_id and targets[-1] == byte.eos_id, "never split across rows"
            text = bytes(np.r_[inputs[1:], targets[-1:]][:-1].astype(np.uint8)).decode()
            prompt, response = re.fullmatch(r"<\|user\|>\n(q+)\n<\|assistant\|>\n(a+)", text).groups()
            assert weights.sum() == len(response) + 1 and np.all(weights[-len(response) - 1:] == 1)
            rows[row] = rows.get(row, 0) + 1
        padding = batch["segment_ids"] == 0
        assert np.all(batch["weights"][padding] == 0)
        docs_per_row += list(rows.values())
    assert max(docs_per_row) > 1, "several examples share a row"


BAD_RECORDS = [
    ("{not json", r"not valid JSON"),
    ('["a list"]', r"must be a JSON object"),
    ('{"prompt": "hi"}', r"no 'response' field"),
    ('{"question": "hi"}', r"neither 'messages' nor 'prompt'/'response'"),
    ('{"prompt": 3, "response": "x"}', r"field 'prompt' is int, not a string"),
    ('{"prompt": "hi", "response": ["x"]}', r"field 'response' is list, not a string"),
    ('{"prompt": "hi", "response": ""}', r"field 'response' is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\]: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}',
     r"messages\[0\]: field 'content' is int"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     r"messages\[1\]: field 'content' is empty"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] must be an object with 'role' and 'content'"),
    ('{"messages": []}', r"field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     r"ends with a 'user' turn"),
    ('{"prompt": "a", "response": "b", "task": 5}', r"field 'task' must be a non-empty string"),
]


@pytest.mark.parametrize("line,message", BAD_RECORDS)
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok", "response": "fine"}', "", line])
    with pytest.raises(DataError, match=re.escape("bad.jsonl:3") + ".*" + message):
        sft.read_records([path], load_config("default").data.sft)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"x\.txt is not a \.jsonl file"):
        sft_data(tmp_path / "x.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"e\.jsonl: file is empty"):
        sft_data(tmp_path / "e.jsonl")


@pytest.mark.filterwarnings("ignore:data.source=sft")
def test_overlong_drop_truncate_error_are_counted(tmp_path):
    # Tokens after the shift: 24 template bytes + bos + eos - 1 + len(prompt) + len(response).
    records = [{"prompt": "p" * 5, "response": "r" * 5}, {"prompt": "p" * 20, "response": "r" * 20},
               {"prompt": "p" * 40, "response": "r"}, {"prompt": "p", "response": "r"}]
    path = write_jsonl(tmp_path / "o.jsonl", records)
    with pytest.warns(UserWarning, match="2 dropped, 0 truncated"):
        data = sft_data(path, seq_len=64)
    assert "2 train / 0 val examples, 2 dropped, 0 truncated" in data.summary
    data = sft_data(path, "data.sft.overlong=truncate", seq_len=64)
    # The 20/20 record keeps its prompt and part of its response; the 40/1 record loses its whole
    # response to truncation and is dropped.
    assert "3 train / 0 val examples, 1 dropped, 1 truncated" in data.summary
    batch = next(data.train_iterator())
    cut = [row for row, cols in segments(batch) if len(cols) == 64]
    assert cut, "the truncated record fills a whole row"
    # Its first 65 tokens: bos, 44 of template and prompt, the 20 response bytes; the eos is cut.
    assert batch["weights"][cut[0]].sum() == 20 and batch["targets"][cut[0], -1] == ord("r")
    with pytest.raises(DataError, match=r"o\.jsonl:2: 66 tokens \(65 after the input/target shift\) do not fit data.seq_len=64"):
        sft_data(path, "data.sft.overlong=error", seq_len=64)
    with pytest.raises(DataError, match="only 0 training records"):
        sft_data(write_jsonl(tmp_path / "long.jsonl", records[2:3]), seq_len=64)


def test_split_and_resume_give_identical_batches(tmp_path):
    records = [{"prompt": f"q{i}", "response": f"a{i}", "task": "t"} for i in range(60)]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    data = sft_data(path, "data.val_fraction=0.1", "data.seed=3")
    assert "54 train / 6 val examples" in data.summary
    held_out = {data.decode(b["targets"][r, cols]) for b in data.eval_batches() for r, cols in segments(b)}
    assert all(re.search(r"a5[4-9]$", text) for text in held_out), "the last records are held out"
    iterator = data.train_iterator()
    for _ in range(2):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = sft_data(path, "data.val_fraction=0.1", "data.seed=3").train_iterator()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other_seed = next(sft_data(path, "data.val_fraction=0.1", "data.seed=4").train_iterator())
    assert not np.array_equal(other_seed["inputs"], next(sft_data(path, "data.val_fraction=0.1", "data.seed=3")
                                                         .train_iterator())["inputs"])


def test_score_is_exact_match_of_whole_response_per_task(tmp_path):
    records = [{"prompt": "x", "response": "ab", "task": "beta"}, {"prompt": "y", "response": "cd", "task": "alpha"},
               {"prompt": "z", "response": "ef"}]
    data = sft_data(write_jsonl(tmp_path / "s.jsonl", records), batch=4)
    assert data.buckets == {1: "(no task)", 2: "alpha", 3: "beta"}
    assert "k1=(no task), k2=alpha, k3=beta" in data.summary
    batch = next(data.train_iterator())
    per_bucket = {}
    for row, cols in segments(batch):
        bucket = int(batch["hops"][row, cols].max())
        per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
    assert len(per_bucket) == 3
    assert data.score(batch["targets"], batch) == {b: (n, n) for b, n in sorted(per_bucket.items())}
    row, cols = next(segments(batch))
    bucket = int(batch["hops"][row, cols].max())
    wrong = batch["targets"].copy()
    wrong[row, cols[-1]] += 1  # only the eos of one response is wrong: that whole response is wrong
    expected = {b: (n - (b == bucket), n) for b, n in sorted(per_bucket.items())}
    assert data.score(wrong, batch) == expected


def _follow(prompt: str, start: str, k: int) -> str:
    edges = dict(re.findall(r"(\S+) -> (\S+) ;", prompt))
    for _ in range(k):
        start = edges[start]
    return start


def _prefix_value(tokens: list[str], modulus: int) -> int:
    def node(i):
        if tokens[i] not in "+-x":
            return int(tokens[i]), i + 1
        a, j = node(i + 1)
        b, j = node(j)
        return {"+": a + b, "-": a - b, "x": a * b}[tokens[i]] % modulus, j

    value, end = node(0)
    assert end == len(tokens)
    return value


def test_generated_sets_are_deterministic_and_correct(tmp_path):
    records = make_records("mix", 60, seed=5)
    assert records == make_records("mix", 60, seed=5) and records != make_records("mix", 60, seed=6)
    assert {r["task"] for r in records} == {"depo", "mano", "brevo"}
    for r in records:
        prompt, response = r["prompt"], r["response"]
        if r["task"] == "depo":
            start, k = re.search(r"Start at (\S+) and follow (\d+) edge", prompt).groups()
            assert response == _follow(prompt, start, int(k))
        elif r["task"] == "mano":
            modulus, expression = re.fullmatch(r"Compute mod (\d+) \(prefix notation\): (.*)", prompt).groups()
            assert int(response) == _prefix_value(expression.split(), int(modulus))
        else:
            parents = {}
            for a, b in re.findall(r"(\S+) -> (\S+) ;", prompt):
                parents.setdefault(b, set()).add(a)
            query = re.search(r"List every node (\S+) depends on", prompt).group(1)
            reach, frontier = set(), [query]
            while frontier:
                frontier = [p for v in frontier for p in parents.get(v, ()) if p not in reach]
                reach.update(frontier)
            answer = response.split()
            assert set(answer) == reach and len(answer) == len(reach)
            assert all(answer.index(p) < answer.index(v) for v in answer for p in parents.get(v, ()))
    import importlib
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
    importlib.import_module("make_sft_data").main(["--task", "mano", "--n", "5", "--out", str(tmp_path / "m.jsonl"),
                                                   "--seed", "2"])
    written = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert written == make_records("mano", 5, seed=2)


def test_tiny_model_trains_on_sft_and_reports_exact_match(tmp_path):
    from layerjax.train.loop import train

    echo = [{"task": "echo", "messages": [{"role": "user", "content": f"say {i}"},
                                          {"role": "assistant", "content": str(i)}]} for i in range(20)]
    mano = make_records("mano", 80, seed=1)
    path = write_jsonl(tmp_path / "mix.jsonl", [r for i in range(20) for r in (*mano[4 * i:4 * i + 4], echo[i])])
    cfg = load_config("default", [*TINY_RUN, "data.source=sft", f"data.paths={path}", "data.val_fraction=0.2",
                                  "data.seq_len=128", "model.max_seq_len=128", "train.steps=3", "train.eval_every=3",
                                  f"train.run_dir={tmp_path / 'run'}"])
    summary = train(cfg)
    assert np.isfinite(summary["val_loss"])
    assert 0 <= summary["val_accuracy"] <= 1
    assert {"val_accuracy_k1", "val_accuracy_k2"} <= set(summary)  # k1=echo, k2=mano


def test_generated_records_take_task_lists_and_generator_settings(tmp_path):
    records = make_records(["mano", "depo"], 40, seed=3, settings={"mano": {"modulus": 7, "max_ops": 1}})
    assert {r["task"] for r in records} == {"mano", "depo"}
    for r in records:
        if r["task"] == "mano":  # one operator mod 7: the response is that operation's value
            op, a, b = r["prompt"].split(": ")[1].split()
            assert "mod 7" in r["prompt"] and int(r["response"]) == {"+": int(a) + int(b), "-": int(a) - int(b),
                                                                   "x": int(a) * int(b)}[op] % 7
    assert make_records("mix", 9, seed=1) == make_records(["depo", "mano", "brevo"], 9, seed=1)
    with pytest.raises(ValueError, match="no setting \\['hops'\\]"):
        make_records("depo", 1, settings={"depo": {"hops": 2}})
    with pytest.raises(ValueError, match="not among the tasks"):
        make_records("depo", 1, settings={"mano": {"modulus": 7}})
    with pytest.raises(ValueError, match="not one of"):
        make_records(["depo", "sudoku"], 1)
    import importlib
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
    tool = importlib.import_module("make_sft_data")
    tool.main(["--task", "depo,mano", "--set", "mano.modulus=7", "--n", "6", "--out", str(tmp_path / "x.jsonl")])
    assert [json.loads(line) for line in open(tmp_path / "x.jsonl")] == make_records(
        ["depo", "mano"], 6, settings={"mano": {"modulus": 7}})
    with pytest.raises(SystemExit):
        tool.main(["--task", "depo", "--set", "depo.max_hops", "--n", "1", "--out", str(tmp_path / "y.jsonl")])
