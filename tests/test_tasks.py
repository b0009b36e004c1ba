"""The synthetic playground beside Depo: Brevo, Mano and associative recall generate valid samples
(answers recomputed independently from the sample tokens), feed the shared pipeline, and train;
the Brevo metric accepts any valid order and nothing else."""

import numpy as np
import pytest

from conftest import TINY_RUN
from layerjax.config import BrevoConfig, ConfigError, ManoConfig, RecallConfig, load_config
from layerjax.data import brevo, build_data, mano, recall
from layerjax.data.brevo import BrevoTask
from layerjax.data.mano import ManoTask
from layerjax.data.recall import RecallTask
from layerjax.train.loop import train


def _evaluate_prefix(tokens: list[int], task: ManoTask) -> int:
    """A recursive prefix evaluator written independently of the generator's stack evaluator."""
    position = 0

    def node() -> int:
        nonlocal position
        t = tokens[position]
        position += 1
        if t >= task.number_base:
            return t - task.number_base
        a, b = node(), node()
        return {mano.PLUS: a + b, mano.MINUS: a - b, mano.TIMES: a * b}[t] % task.cfg.modulus

    value = node()
    assert position == len(tokens), "trailing tokens after the expression"
    return value


@pytest.mark.parametrize("cfg", [ManoConfig(), ManoConfig(min_ops=5, max_ops=12, modulus=23),
                                 ManoConfig(min_ops=1, max_ops=1, modulus=7)])
def test_mano_samples_are_valid(cfg):
    task = ManoTask(cfg)
    lengths = set()
    for index in range(300):
        s = task.sample(index, seed=3)
        tokens = [int(t) for t in s["tokens"]]
        assert tokens[0] == mano.BOS and tokens[-1] == mano.EOS and tokens[-3] == mano.EQUALS
        ops = tokens[1] - mano.LENGTH_BASE + 1
        expression = tokens[2:-3]
        assert sum(t in (mano.PLUS, mano.MINUS, mano.TIMES) for t in expression) == ops
        assert cfg.min_ops <= ops <= cfg.max_ops
        assert tokens[-2] - task.number_base == _evaluate_prefix(expression, task)
        assert task.parse_and_solve(tokens) == (ops, tokens[-2] - task.number_base)
        assert s["weights"].sum() == len(tokens)  # loss on every token
        assert list(np.flatnonzero(s["answer_ids"])) == [len(tokens) - 2] and s["hops"][-2] == ops
        assert len(tokens) <= task.max_length
        lengths.add(ops)
    assert lengths == set(range(cfg.min_ops, cfg.max_ops + 1))
    assert task.sample(5, seed=3)["tokens"].tolist() == task.sample(5, seed=3)["tokens"].tolist()
    assert task.sample(5, seed=3)["tokens"].tolist() != task.sample(5, seed=3, split="eval")["tokens"].tolist()


@pytest.mark.parametrize("cfg", [RecallConfig(), RecallConfig(pairs=8, queries=8, num_keys=8, num_values=3)])
def test_recall_samples_are_valid(cfg):
    task = RecallTask(cfg)
    for index in range(200):
        s = task.sample(index, seed=1)
        tokens = s["tokens"]
        keys = tokens[1:1 + 2 * cfg.pairs:2]
        assert len(set(keys.tolist())) == cfg.pairs  # distinct keys
        answers = task.parse_and_solve(tokens)
        # The answer tokens the generator wrote, at the weighted value positions.
        written = [int(tokens[i]) for i in np.flatnonzero(s["weights"]) if tokens[i] != recall.SEP]
        assert written == answers
        # Independently: for each query, scan the pairs for its key.
        start = 1 + 2 * cfg.pairs
        queries = tokens[start:-1].reshape(cfg.queries, 5)
        for j, (q, answer) in enumerate(zip(queries, answers)):
            position = int(np.flatnonzero(keys == q[1])[0])
            assert tokens[2 + 2 * position] == answer == q[3]
            quarter = 1 + (4 * (cfg.pairs - 1 - position)) // cfg.pairs  # 1 = newest quarter
            assert s["hops"][start + 5 * j + 3] == s["hops"][start + 5 * j + 4] == quarter
            assert s["answer_ids"][start + 5 * j + 3] == j + 1


def test_task_config_errors():
    with pytest.raises(ConfigError, match="pairs <= num_keys"):
        RecallTask(RecallConfig(pairs=9, num_keys=8))
    with pytest.raises(ConfigError, match="min_ops <= max_ops"):
        ManoTask(ManoConfig(min_ops=3, max_ops=2))
    with pytest.raises(ConfigError, match="too short for the longest data.source='mano'"):
        build_data(load_config("default", ["data.source=mano", "data.mano.max_ops=100", "model.max_seq_len=128"]))


@pytest.mark.parametrize("source", ["mano", "recall", "brevo"])
def test_tasks_train_and_report_exact_match(tmp_path, source):
    cfg = load_config("default", [*TINY_RUN, f"data.source={source}", "train.steps=4", "train.eval_every=4",
                                  f"train.run_dir={tmp_path}", "data.brevo.max_nodes=6", "data.brevo.max_degree=2"])
    data = build_data(cfg)
    batch = next(data.train_iterator())
    assert batch["answer_ids"].max() > 0 and batch["hops"].max() > 0
    summary = train(cfg)
    assert 0 <= summary["val_accuracy"] <= 1
    chance = {"mano": 1 / 23, "recall": 1 / 64, "brevo": None}[source]
    assert summary.get("chance_accuracy") == (pytest.approx(chance) if chance else None)
    assert any(k.startswith("val_accuracy_k") for k in summary)


def _is_topological_answer(parents: dict, query: int, answer: list) -> bool:
    """Independent check: the answer is exactly the query's ancestors, each after its parents."""
    reach, frontier = set(), [query]
    while frontier:  # breadth-first over parent links
        frontier = [p for v in frontier for p in parents.get(v, ()) if p not in reach]
        reach.update(frontier)
    position = {v: i for i, v in enumerate(answer)}
    return set(answer) == reach and len(answer) == len(reach) and all(
        position[p] < position[v] for v in answer for p in parents.get(v, ()))


@pytest.mark.parametrize("cfg", [BrevoConfig(), BrevoConfig(min_nodes=12, max_nodes=24, max_degree=2, name_vocab=24)])
def test_brevo_samples_are_valid(cfg):
    task = BrevoTask(cfg)
    sizes = set()
    for index in range(200):
        s = task.sample(index, seed=2)
        parents, query, answer = BrevoTask.parse(s["tokens"])
        assert _is_topological_answer(parents, query, answer)
        in_degree = {v: len(p) for v, p in parents.items()}
        out_degree = {v: sum(v in p for p in parents.values()) for v in parents}
        assert max(in_degree.values()) <= cfg.max_degree and max(out_degree.values()) <= cfg.max_degree
        assert len(s["tokens"]) <= task.max_length
        weighted = s["tokens"][s["weights"] > 0].tolist()
        assert weighted == answer + [brevo.SEP]
        assert set(s["hops"][s["answer_ids"] > 0].tolist()) == {len(answer)}
        sizes.add(len(answer))
    assert len(sizes) > 3  # answers of many breadths


def test_brevo_metric_accepts_any_valid_order_and_only_those():
    task = BrevoTask(BrevoConfig(min_nodes=8, max_nodes=8))
    sample = next(s for s in (task.sample(i, seed=0) for i in range(100)) if (s["answer_ids"] > 0).sum() >= 4)
    tokens = sample["tokens"]
    parents, query, answer = BrevoTask.parse(tokens)
    batch = {"inputs": tokens[None, :-1], "targets": tokens[None, 1:], "answer_ids": sample["answer_ids"][None, 1:],
             "hops": sample["hops"][None, 1:], "segment_ids": np.ones((1, len(tokens) - 1), np.int32)}
    cols = np.flatnonzero(batch["answer_ids"][0])

    def score_with(first_choice):
        """Teacher-forced predictions that put `first_choice` first where the gold order has its
        first answer node (every later position predicts the gold token)."""
        predictions = batch["targets"].copy()
        predictions[0, cols[0]] = first_choice
        return brevo.score(predictions, batch)

    assert brevo.score(batch["targets"].copy(), batch) == {len(answer): (1, 1)}
    roots = [v for v in answer if not parents[v]]  # any ancestor without parents may come first
    for root in roots:
        assert score_with(root)[len(answer)] == (1, 1)
    not_ready = [v for v in answer if parents[v]]
    assert not_ready and score_with(not_ready[0])[len(answer)] == (0, 1)
    assert score_with(brevo.SEP)[len(answer)] == (0, 1)
