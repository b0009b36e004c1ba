"""Associative recall: a list of key-value pairs, then queries "? key => value". The small task on
which Physics of Language Models 4.1 shows that one attention layer with canon layers learns what
one without them cannot (finding a key's value needs the key and value tokens mixed first, which
plain attention does with an induction head over two layers, and a canon layer does in one).

Tokens: 0 pad, 1 bos, 2 eos, 3 "?", 4 "=>", 5 ";", then num_keys key tokens, then num_values
value tokens. A sample is  bos (k v)*pairs (? k => v ;)*queries eos  with distinct keys. The loss
is on the answers (value and closing ";"); `hops` buckets each answer by how far back its pair
sits, in quarters of the list (1 = most recent quarter, 4 = the oldest).
"""

from __future__ import annotations

import numpy as np

from layerjax.config import ConfigError
from layerjax.data.seeding import STREAMS, keyed_generator

PAD, BOS, EOS, QUERY, ANSWER, SEP = range(6)
KEY_BASE = 6
_TEXT = {BOS: "<bos>", EOS: "<eos>", QUERY: "?", ANSWER: "=>", SEP: ";"}


class RecallTask:
    def __init__(self, c):
        if not 1 <= c.pairs <= c.num_keys:
            raise ConfigError(f"data.recall needs 1 <= pairs <= num_keys (distinct keys), got {c.pairs}, {c.num_keys}")
        if c.num_values < 2 or c.queries < 1:
            raise ConfigError("data.recall needs num_values >= 2 and queries >= 1")
        self.cfg = c
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.value_base = KEY_BASE + c.num_keys
        self.vocab_size = self.value_base + c.num_values
        self.max_length = 2 + 2 * c.pairs + 4 * c.queries
        self.chance_accuracy = 1.0 / c.num_values

    def sample(self, index: int, seed: int, split: str = "train") -> dict[str, np.ndarray]:
        c = self.cfg
        rng = keyed_generator(int(seed), STREAMS[split], int(index))
        keys = rng.choice(c.num_keys, size=c.pairs, replace=False)
        values = rng.integers(0, c.num_values, size=c.pairs)
        asked = rng.integers(0, c.pairs, size=c.queries)
        pairs = np.stack([KEY_BASE + keys, self.value_base + values], 1).ravel()
        queries = np.stack([np.full(c.queries, QUERY), KEY_BASE + keys[asked], np.full(c.queries, ANSWER),
                            self.value_base + values[asked], np.full(c.queries, SEP)], 1)
        tokens = np.r_[BOS, pairs, queries.ravel(), EOS].astype(np.int32)
        answer = np.zeros((c.queries, 5), np.int32)
        answer[:, 3:] = 1
        recency = 1 + (4 * (c.pairs - 1 - asked)) // c.pairs  # 1..4: quarter of the list, newest first
        ids = np.zeros(len(tokens), np.int32)
        hops = np.zeros(len(tokens), np.int32)
        start = 1 + 2 * c.pairs
        ids[start:start + 5 * c.queries] = (answer * np.arange(1, c.queries + 1)[:, None]).ravel()
        hops[start:start + 5 * c.queries] = (answer * recency[:, None]).ravel()
        return {"tokens": tokens, "weights": (ids > 0).astype(np.float32), "hops": hops, "answer_ids": ids}

    def decode(self, ids) -> str:
        words = []
        for t in (int(i) for i in ids):
            if t >= self.value_base:
                words.append(f"v{t - self.value_base}")
            elif t >= KEY_BASE:
                words.append(f"k{t - KEY_BASE}")
            elif t != PAD:
                words.append(_TEXT[t])
        return " ".join(words)

    def parse_and_solve(self, ids) -> list[int]:
        """Each query's value token, looked up from the pairs written in the sample."""
        tokens = [int(t) for t in ids if int(t) != PAD]
        first_query = tokens.index(QUERY)
        pairs = tokens[1:first_query]
        table = dict(zip(pairs[0::2], pairs[1::2]))
        if len(table) != len(pairs) // 2:
            raise ValueError("a key appears twice")
        queries = tokens[first_query:-1]
        return [table[queries[i + 1]] for i in range(0, len(queries), 5)]
