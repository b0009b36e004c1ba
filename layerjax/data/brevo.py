"""Brevo, the reasoning-breadth task of "Physics of Language Models, Part 4.1": a random DAG (in-
and out-degree at most `max_degree`) written as its edges in random order, then a query node; the
answer lists every node the query depends on (its ancestors), each after its own parents: any
topological order of the ancestors is right.

Tokens: 0 pad, 1 bos, 2 eos, 3 "->", 4 ";", 5 "?", 6 "=>", then `name_vocab` name tokens. An edge
"a -> b ;" means b depends on a. A sample is

    bos  (a -> b ;)*  ? q =>  (ancestor)+  ;  eos

The generator writes one random valid order and trains on it; the metric (`score`) accepts any
valid order: under teacher forcing, every answer position must predict a node that may come next
given the answer so far (not yet listed, all its parents listed), and the closing ";" must come
once all ancestors are listed. `hops` buckets a query by its number of ancestors.
"""

from __future__ import annotations

import numpy as np

from layerjax.config import ConfigError
from layerjax.data.seeding import STREAMS, keyed_generator

PAD, BOS, EOS, ARROW, SEP, QUERY, ANSWER = range(7)
NAME_BASE = 7
_TEXT = {BOS: "<bos>", EOS: "<eos>", ARROW: "->", SEP: ";", QUERY: "?", ANSWER: "=>"}


class BrevoTask:
    def __init__(self, c):
        if not 2 <= c.min_nodes <= c.max_nodes <= c.name_vocab:
            raise ConfigError(f"data.brevo needs 2 <= min_nodes <= max_nodes <= name_vocab, got "
                              f"{c.min_nodes}, {c.max_nodes}, {c.name_vocab}")
        if c.max_degree < 1:
            raise ConfigError(f"data.brevo.max_degree={c.max_degree} must be at least 1")
        self.cfg = c
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.vocab_size = NAME_BASE + c.name_vocab
        most_edges = c.max_degree * (c.max_nodes - 1)
        self.max_length = 2 + 4 * most_edges + 3 + c.max_nodes  # bos, edges, ? q =>, answer, ;, eos
        self.chance_accuracy = None  # depends on the graph; the per-size accuracies speak for themselves

    def sample(self, index: int, seed: int, split: str = "train") -> dict[str, np.ndarray]:
        c = self.cfg
        rng = keyed_generator(int(seed), STREAMS[split], int(index))
        n = int(rng.integers(c.min_nodes, c.max_nodes + 1))
        parents = self._random_dag(n, rng)
        names = NAME_BASE + rng.choice(c.name_vocab, size=n, replace=False)
        edges = [(p, child) for child in range(n) for p in parents[child]]
        edges = [edges[i] for i in rng.permutation(len(edges))]
        # The query: a node with at least one ancestor (node 0 of the hidden order has none).
        candidates = [v for v in range(n) if parents[v]]
        query = candidates[int(rng.integers(len(candidates)))]
        answer = self._random_topological_order(ancestors(parents, query), parents, rng)
        tokens = [BOS]
        for p, child in edges:
            tokens += [names[p], ARROW, names[child], SEP]
        tokens += [QUERY, names[query], ANSWER]
        start = len(tokens)
        tokens += [names[v] for v in answer] + [SEP, EOS]
        tokens = np.array(tokens, np.int32)
        weights = np.zeros(len(tokens), np.float32)
        weights[start:start + len(answer) + 1] = 1  # the answer and its closing ";"
        answer_ids = (weights > 0).astype(np.int32)
        return {"tokens": tokens, "weights": weights, "hops": answer_ids * min(len(answer), 63),
                "answer_ids": answer_ids}

    def _random_dag(self, n: int, rng) -> list[list[int]]:
        """parents[v] for nodes 0..n-1 in a hidden topological order; every node after the first
        has 1..max_degree parents among earlier nodes whose out-degree is below max_degree."""
        c = self.cfg
        out_degree = np.zeros(n, np.int64)
        parents: list[list[int]] = [[]]
        for v in range(1, n):
            open_nodes = np.flatnonzero(out_degree[:v] < c.max_degree)
            if open_nodes.size == 0:  # every earlier node is full: v starts a new root
                parents.append([])
                continue
            k = int(rng.integers(1, min(c.max_degree, open_nodes.size) + 1))
            chosen = sorted(int(p) for p in rng.choice(open_nodes, size=k, replace=False))
            out_degree[chosen] += 1
            parents.append(chosen)
        return parents

    @staticmethod
    def _random_topological_order(nodes: set[int], parents, rng) -> list[int]:
        """A uniformly chosen next node among those whose parents are all listed, repeatedly."""
        order, listed = [], set()
        while len(order) < len(nodes):
            ready = sorted(v for v in nodes - listed if all(p in listed for p in parents[v]))
            v = ready[int(rng.integers(len(ready)))]
            order.append(v)
            listed.add(v)
        return order

    def decode(self, ids) -> str:
        return " ".join(f"n{t - NAME_BASE}" if t >= NAME_BASE else _TEXT[t]
                        for t in (int(i) for i in ids) if t != PAD)

    # ------------------------------------------------------------------ reading samples

    @staticmethod
    def parse(ids) -> tuple[dict[int, set[int]], int, list[int]]:
        """(parents by name token, query name, answer names) read from a sample's tokens."""
        tokens = [int(t) for t in ids if int(t) != PAD]
        query_at = tokens.index(QUERY)
        parents: dict[int, set[int]] = {}
        for i in range(1, query_at, 4):
            a, arrow, b, sep = tokens[i:i + 4]
            if arrow != ARROW or sep != SEP:
                raise ValueError(f"malformed edge {tokens[i:i + 4]}")
            parents.setdefault(b, set()).add(a)
            parents.setdefault(a, set())
        query = tokens[query_at + 1]
        end = tokens.index(SEP, query_at + 3)
        return parents, query, tokens[query_at + 3:end]


def ancestors(parents, node) -> set:
    """Every node with a path to `node` (parents: a list or dict of parent collections)."""
    seen, stack = set(), list(parents[node])
    while stack:
        v = stack.pop()
        if v not in seen:
            seen.add(v)
            stack.extend(parents[v])
    return seen


def allowed_next(parents, query, prefix: list) -> set:
    """What may come next in a valid answer after `prefix`: unlisted ancestors whose parents are
    all listed, or SEP once every ancestor is listed."""
    remaining = ancestors(parents, query) - set(prefix)
    if not remaining:
        return {SEP}
    listed = set(prefix)
    return {v for v in remaining if parents[v] <= listed}


def score(predictions: np.ndarray, batch: dict[str, np.ndarray]) -> dict[int, tuple[int, int]]:
    """Exact match of Brevo answers accepting any valid order (teacher forcing), per bucket.

    Each (row, document) with an answer is read back from the batch: its tokens are the first
    input followed by the targets, which rebuilds the graph, the query and the gold answer."""
    counts: dict[int, list[int]] = {}
    answer_ids, segments = np.asarray(batch["answer_ids"]), np.asarray(batch["segment_ids"])
    for row, segment in {(int(r), int(segments[r, c])) for r, c in zip(*np.nonzero(answer_ids > 0))}:
        cols = np.flatnonzero(segments[row] == segment)
        tokens = [int(batch["inputs"][row, cols[0]]), *map(int, batch["targets"][row, cols])]
        parents, query, answer = BrevoTask.parse(tokens)
        answer_cols = cols[answer_ids[row, cols] > 0]  # target positions of the answer and its ";"
        gold = answer + [SEP]
        correct = all(int(predictions[row, col]) in allowed_next(parents, query, gold[:j])
                      for j, col in enumerate(answer_cols))
        bucket = int(batch["hops"][row, answer_cols[0]])
        entry = counts.setdefault(bucket, [0, 0])
        entry[0] += int(correct)
        entry[1] += 1
    return {k: (c, n) for k, (c, n) in sorted(counts.items())}
