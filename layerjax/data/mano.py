"""Mano, the knowledge-manipulation task of "Physics of Language Models, Part 4.1": evaluate a
prefix-notation expression of L operations (+, -, x) over integers mod 23. The arithmetic tables
must live in the weights; the expression must be evaluated inside one forward pass per token.

Tokens: 0 pad, 1 bos, 2 eos, 3 "=", 4 "+", 5 "-", 6 "x", then max_ops length tokens ("L=1" ..),
then the numbers 0..modulus-1. A sample is

    bos  L=l  (prefix expression with l operators and l+1 numbers)  =  answer  eos

The loss is on every token (the paper trains on whole expressions); accuracy is exact match of
the answer, reported per L (the `hops` column carries L on the answer token).
"""

from __future__ import annotations

import numpy as np

from layerjax.config import ConfigError
from layerjax.data.seeding import STREAMS, keyed_generator

PAD, BOS, EOS, EQUALS, PLUS, MINUS, TIMES = range(7)
LENGTH_BASE = 7
_OPS = {PLUS: lambda a, b, m: (a + b) % m, MINUS: lambda a, b, m: (a - b) % m, TIMES: lambda a, b, m: (a * b) % m}
_TEXT = {BOS: "<bos>", EOS: "<eos>", EQUALS: "=", PLUS: "+", MINUS: "-", TIMES: "x"}


class ManoTask:
    def __init__(self, c):
        if not 1 <= c.min_ops <= c.max_ops:
            raise ConfigError(f"data.mano needs 1 <= min_ops <= max_ops, got {c.min_ops}, {c.max_ops}")
        if c.modulus < 2:
            raise ConfigError(f"data.mano.modulus={c.modulus} must be at least 2")
        self.cfg = c
        self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS
        self.number_base = LENGTH_BASE + c.max_ops
        self.vocab_size = self.number_base + c.modulus
        self.max_length = 2 * c.max_ops + 6  # bos, L, ops, numbers, =, answer, eos
        self.chance_accuracy = 1.0 / c.modulus

    def sample(self, index: int, seed: int, split: str = "train") -> dict[str, np.ndarray]:
        c = self.cfg
        rng = keyed_generator(int(seed), STREAMS[split], int(index))
        ops = int(rng.integers(c.min_ops, c.max_ops + 1))
        expression = self._expression(ops, rng)
        answer = self.evaluate(expression)
        tokens = np.array([BOS, LENGTH_BASE + ops - 1, *expression, EQUALS, self.number_base + answer, EOS], np.int32)
        answer_at = np.zeros(len(tokens), np.int32)
        answer_at[-2] = 1
        return {"tokens": tokens, "weights": np.ones(len(tokens), np.float32), "hops": answer_at * ops,
                "answer_ids": answer_at}

    def _expression(self, ops: int, rng) -> list[int]:
        """A uniformly shaped random binary tree of `ops` operators in prefix order."""
        if ops == 0:
            return [self.number_base + int(rng.integers(self.cfg.modulus))]
        left = int(rng.integers(ops))  # operators in the left subtree
        operator = int(rng.choice([PLUS, MINUS, TIMES]))
        return [operator, *self._expression(left, rng), *self._expression(ops - 1 - left, rng)]

    def evaluate(self, prefix: list[int]) -> int:
        """Evaluates prefix tokens right to left with a stack (independent of how they were drawn)."""
        stack: list[int] = []
        for t in reversed(prefix):
            if t >= self.number_base:
                stack.append(t - self.number_base)
            else:
                a, b = stack.pop(), stack.pop()
                stack.append(_OPS[t](a, b, self.cfg.modulus))
        if len(stack) != 1:
            raise ValueError(f"malformed prefix expression {prefix}")
        return stack[0]

    def decode(self, ids) -> str:
        words = []
        for t in (int(i) for i in ids):
            if t >= self.number_base:
                words.append(str(t - self.number_base))
            elif t >= LENGTH_BASE:
                words.append(f"L={t - LENGTH_BASE + 1}")
            elif t != PAD:
                words.append(_TEXT[t])
        return " ".join(words)

    def parse_and_solve(self, ids) -> tuple[int, int]:
        """(L, answer) recomputed from a sample's expression tokens."""
        tokens = [int(t) for t in ids if int(t) != PAD]
        equals = tokens.index(EQUALS)
        expression = tokens[2:equals]
        ops = sum(1 for t in expression if t in _OPS)
        if tokens[1] != LENGTH_BASE + ops - 1:
            raise ValueError("the length token does not match the expression")
        return ops, self.evaluate(expression)
