"""Depo, the reasoning-depth task of "Physics of Language Models, Part 4.1".

A sample lists every edge of a few random directed cycles in random order, then asks for the k-th
successor of some nodes. Answering needs k sequential look-ups in the context, so accuracy as a
function of k measures how deep a model can reason within one forward pass.

Token layout (the task has its own vocabulary, independent of any text tokenizer):

    0 pad   1 bos   2 eos   3 "->" (edge arrow)   4 ";" (closes an edge, a query and an answer)
    5 "?" (query marker)   6 "=>" (answer marker)
    7 .. 6+max_hops        hop tokens: the token 6+k means "k steps"
    7+max_hops ..          name tokens (name_vocab of them); a node's name is 1..max_name_len of them

A sample is  bos  (a -> b ;)*  (? x k => y ;)*  eos  with edges in random order. The loss weights
(`weights`) are 1 on the answer name tokens y and on the ";" that closes each answer: the model must
also know where a multi-token name ends, and exact match counts that closing token too.

Generation is vectorised: every random number of a sample comes from one uniform draw, and the
clauses are written as fixed-width rows (names padded with holes) into one buffer whose holes are
dropped at the end. A sample costs a fixed ~50 numpy calls whatever its size: ~0.1 ms for the
default ~40-token samples, ~0.5 ms for 1,400-token samples with 375-node cycles.
"""

from __future__ import annotations

import numpy as np

from layerjax.config import ConfigError
from layerjax.data.seeding import STREAMS, keyed_generator

PAD, BOS, EOS, ARROW, SEP, QUERY, ANSWER = range(7)
HOP_BASE = 7  # the token for k hops is HOP_BASE + k - 1

_SPECIAL_TEXT = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", ARROW: "->", SEP: ";", QUERY: "?",
                 ANSWER: "=>"}


def _uniform_ints(uniforms: np.ndarray, low: int, high: int) -> np.ndarray:
    """Integers uniform in [low, high] from uniforms in [0, 1)."""
    return low + (uniforms * (high - low + 1)).astype(np.int64)


def _ahead(x, k, cycle_start, cycle_size):
    """The node k steps after x along its cycle."""
    if isinstance(cycle_size, int):
        return (x + k) % cycle_size
    return cycle_start[x] + (x - cycle_start[x] + k) % cycle_size[x]


class DepoTask:
    """Deterministic Depo sample generator for one `DepoConfig`."""

    def __init__(self, depo_cfg):
        c = depo_cfg
        self.cfg = c
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.name_base = HOP_BASE + c.max_hops
        self.vocab_size = self.name_base + c.name_vocab
        lengths = np.arange(c.min_name_len, c.max_name_len + 1)
        if c.name_vocab < 1:
            raise ConfigError(f"data.depo.name_vocab={c.name_vocab} must be at least 1")
        if c.num_cycles < 1 or c.queries < 0:
            raise ConfigError("data.depo needs num_cycles >= 1 and queries >= 0")
        if c.max_name_len * np.log2(c.name_vocab + 1) > 62:
            raise ConfigError(
                f"data.depo: name_vocab={c.name_vocab} ** max_name_len={c.max_name_len} names "
                "overflow 64-bit codes; lower data.depo.max_name_len")
        # How many distinct names of each length exist; a sample needs one per node.
        self._capacity = {int(n): c.name_vocab ** int(n) for n in lengths}
        self._fewest_names = min(self._capacity.values())
        most_nodes = c.num_cycles * c.max_nodes
        if sum(self._capacity.values()) < most_nodes:
            raise ConfigError(
                f"data.depo: {most_nodes} nodes (num_cycles*max_nodes) need distinct names but only "
                f"{sum(self._capacity.values())} exist; raise data.depo.name_vocab or max_name_len")

        # Which part of the one uniform draw per sample serves which purpose (sized for the
        # largest sample; smaller ones use a prefix of each part).
        width = c.max_name_len
        counts = {"sizes": c.num_cycles, "name_len": most_nodes, "name_tokens": most_nodes * width,
                  "order": most_nodes, "query": most_nodes, "hops": c.queries}
        ends = np.cumsum(list(counts.values()))
        self._part = {role: slice(int(end - count), int(end))
                      for (role, count), end in zip(counts.items(), ends)}
        self._num_uniforms = int(ends[-1])
        self._columns = np.arange(width)
        self._place_values = (c.name_vocab + 1) ** np.arange(width, dtype=np.int64)
        # Within a query row [? name k => name ;]: the answer name and its closing ";".
        self._answer_columns = np.r_[np.zeros(width + 3, np.int64), np.ones(width + 1, np.int64)]
        self._answer_weight_layout = np.tile(self._answer_columns, c.queries)
        self._answer_id_layout = (self._answer_columns * np.arange(1, c.queries + 1)[:, None]).ravel()

    # ------------------------------------------------------------------ sizes

    @property
    def typical_length(self) -> float:
        """Expected tokens per sample (bos and eos included)."""
        c = self.cfg
        name = (c.min_name_len + c.max_name_len) / 2
        nodes = c.num_cycles * (c.min_nodes + c.max_nodes) / 2
        return 2 + nodes * (2 * name + 2) + c.queries * (2 * name + 4)

    @property
    def chance_accuracy(self) -> float:
        """Exact-match accuracy of answering with a uniformly random node of the sample: E[1/n],
        n the sample's node count (a sum of num_cycles uniform cycle sizes). A model that has
        learned the format but not the look-ups sits here."""
        c = self.cfg
        size = np.zeros(c.max_nodes + 1)
        size[c.min_nodes:] = 1.0 / (c.max_nodes - c.min_nodes + 1)
        nodes = np.array([1.0])
        for _ in range(c.num_cycles):
            nodes = np.convolve(nodes, size)
        n = np.arange(len(nodes))
        return float(np.sum(nodes[1:] / n[1:]))

    @property
    def max_length(self) -> int:
        """Tokens in the longest possible sample (bos and eos included)."""
        c = self.cfg
        edge = 2 * c.max_name_len + 2
        query = 2 * c.max_name_len + 4
        return 2 + c.num_cycles * c.max_nodes * edge + c.queries * query

    # ------------------------------------------------------------------ generation

    def sample(self, index: int, seed: int, split: str = "train") -> dict[str, np.ndarray]:
        """The document for (seed, index): tokens, weights, hops and answer_ids, all of length n.

        `split` picks a seed stream ("train" or "eval") so held-out samples never repeat training
        ones. Every random number comes from one uniform draw, sliced by role: on a slow CPU each
        numpy call costs about a microsecond, so the number of calls is what sets the speed.
        """
        c, width = self.cfg, self.cfg.max_name_len
        rng = keyed_generator(int(seed), STREAMS[split], int(index))
        u = rng.random(self._num_uniforms)
        sizes = _uniform_ints(u[self._part["sizes"]], c.min_nodes, c.max_nodes)
        n = int(sizes.sum())
        # Nodes are 0..n-1, each cycle a consecutive range; random names hide this order.
        if c.num_cycles == 1:
            cycle_start, cycle_size = 0, n
        else:
            cycle_start = np.repeat(np.cumsum(sizes) - sizes, sizes)
            cycle_size = np.repeat(sizes, sizes)

        names = self._draw_names(u, n, rng)  # [n, width], -1 after each name's end
        edge_from = np.argsort(u[self._part["order"]][:n])  # the edges' random order
        edge_to = _ahead(edge_from, 1, cycle_start, cycle_size)
        q = c.queries
        # Distinct query nodes (cycling through them again only if there are more queries than nodes).
        q_from = np.resize(np.argsort(u[self._part["query"]][:n]), q)
        q_hops = _uniform_ints(u[self._part["hops"]][:q], 1, c.max_hops)
        q_to = _ahead(q_from, q_hops, cycle_start, cycle_size)

        # One buffer, four rows (token, weight, hops, answer id), clauses as fixed-width rows
        # with -1 holes where a name is shorter than max_name_len; the holes are dropped at the end.
        edge_width, query_width = 2 * width + 2, 2 * width + 4
        query_part = slice(1 + n * edge_width, 1 + n * edge_width + q * query_width)
        layout = np.zeros((4, query_part.stop + 1), np.int32)
        layout[0, 0], layout[0, -1] = BOS, EOS
        edges = layout[0, 1:query_part.start].reshape(n, edge_width)
        edges[:, :width] = names[edge_from]
        edges[:, width] = ARROW
        edges[:, width + 1:2 * width + 1] = names[edge_to]
        edges[:, -1] = SEP
        queries = layout[0, query_part].reshape(q, query_width)
        queries[:, 0] = QUERY
        queries[:, 1:width + 1] = names[q_from]
        queries[:, width + 1] = HOP_BASE + q_hops - 1
        queries[:, width + 2] = ANSWER
        queries[:, width + 3:2 * width + 3] = names[q_to]
        queries[:, -1] = SEP
        # Nonzero on the answer name and the ";" that closes it.
        layout[1, query_part] = self._answer_weight_layout
        layout[2, query_part] = (self._answer_columns * q_hops[:, None]).ravel()
        layout[3, query_part] = self._answer_id_layout
        tokens, weights, hops, answer_ids = layout[:, layout[0] >= 0]
        return {"tokens": tokens, "weights": weights.astype(np.float32), "hops": hops,
                "answer_ids": answer_ids}

    def _draw_names(self, u: np.ndarray, n: int, rng) -> np.ndarray:
        """Distinct random names as rows of `max_name_len` tokens, -1 after the name's end.

        Lengths are uniform in [min_name_len, max_name_len] and tokens uniform. The fast path uses
        the shared uniform draw and keeps it if all names differ; on a clash (or when a length has
        fewer possible names than nodes) names are drawn again without replacement per length.
        """
        c, width = self.cfg, self.cfg.max_name_len
        name_len = _uniform_ints(u[self._part["name_len"]][:n], c.min_name_len, width)
        token_uniforms = u[self._part["name_tokens"]][:n * width]
        digits = _uniform_ints(token_uniforms, 1, c.name_vocab).reshape(n, width)
        digits[self._columns[:width] >= name_len[:, None]] = 0  # 0 = past the end, 1..V = token
        codes = np.sort(digits @ self._place_values)
        if n > self._fewest_names or np.any(codes[1:] == codes[:-1]):
            digits = self._draw_names_without_replacement(name_len, rng)
        return np.where(digits > 0, digits + (self.name_base - 1), -1)

    def _draw_names_without_replacement(self, name_len: np.ndarray, rng) -> np.ndarray:
        """The exact (slower) path: per name length, distinct codes via rng.choice."""
        c, width = self.cfg, self.cfg.max_name_len
        self._fit_lengths_to_capacity(name_len)
        digits = np.zeros((len(name_len), width), np.int64)
        for length, capacity in self._capacity.items():
            holders = np.flatnonzero(name_len == length)
            if holders.size == 0:
                continue
            codes = rng.choice(capacity, size=holders.size, replace=False)
            place_values = c.name_vocab ** np.arange(length - 1, -1, -1, dtype=np.int64)
            digits[holders, :length] = 1 + (codes[:, None] // place_values) % c.name_vocab
        return digits

    def _fit_lengths_to_capacity(self, name_len: np.ndarray) -> None:
        """Moves nodes to other name lengths when one length has fewer names than nodes."""
        for length, capacity in self._capacity.items():
            holders = np.flatnonzero(name_len == length)
            for node in holders[capacity:]:
                spare = [m for m, cap in self._capacity.items() if np.count_nonzero(name_len == m) < cap]
                name_len[node] = spare[0]

    # ------------------------------------------------------------------ reading samples

    def decode(self, ids) -> str:
        """Human-readable text: names as n12.n3, edges "a -> b ;", queries "? x k=3 => y ;"."""
        words: list[str] = []
        previous_was_name = False
        for t in (int(i) for i in ids):
            if t >= self.name_base:
                piece = f"n{t - self.name_base}"
                if previous_was_name:
                    words[-1] += "." + piece
                else:
                    words.append(piece)
                previous_was_name = True
                continue
            previous_was_name = False
            if t in _SPECIAL_TEXT:
                if t != PAD:
                    words.append(_SPECIAL_TEXT[t])
            elif HOP_BASE <= t < self.name_base:
                words.append(f"k={t - HOP_BASE + 1}")
            else:
                words.append(f"<{t}?>")
        return " ".join(words)

    def parse_and_solve(self, ids) -> list[tuple[int, list[int]]]:
        """Recomputes every query's answer from the edges written in the sequence.

        Independent of the generator (it reads tokens only), so tests can check that the answers
        the generator wrote are right. Returns [(k, answer name tokens)] in query order.
        """
        tokens = [int(t) for t in ids if int(t) != PAD]
        if not tokens or tokens[0] != BOS or tokens[-1] != EOS:
            raise ValueError("a Depo sample starts with bos and ends with eos")
        clauses, current = [], []
        for t in tokens[1:-1]:
            if t == SEP:
                clauses.append(current)
                current = []
            else:
                current.append(t)
        if current:
            raise ValueError(f"unterminated clause {current}")
        successor: dict[tuple[int, ...], tuple[int, ...]] = {}
        solved = []
        for clause in clauses:
            if clause[0] == QUERY:  # ? name k => answer
                k_at = next(i for i, t in enumerate(clause) if HOP_BASE <= t < self.name_base)
                node, k = tuple(clause[1:k_at]), clause[k_at] - HOP_BASE + 1
                if clause[k_at + 1] != ANSWER:
                    raise ValueError(f"query without answer marker: {clause}")
                for _ in range(k):
                    node = successor[node]
                solved.append((k, list(node)))
            else:  # name -> name
                arrow = clause.index(ARROW)
                source = tuple(clause[:arrow])
                if source in successor:
                    raise ValueError(f"node {source} has two outgoing edges")
                successor[source] = tuple(clause[arrow + 1:])
        return solved
