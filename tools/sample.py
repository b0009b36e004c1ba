#!/usr/bin/env python
"""Sample from a trained run with a KV cache.

    python tools/sample.py RUN_DIR --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-p 0.9
    python tools/sample.py RUN_DIR --depo-sample 3        # Depo runs: answer a held-out query

Greedy decoding with --temperature 0 (the default for Depo prompts).
"""

from __future__ import annotations

import math
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

from layerjax.cli import tool_parser
from layerjax.config import ConfigError
from layerjax.data.depo import DepoTask
from layerjax.data.sources import DataError
from layerjax.data.tokenizers import build_tokenizer
from layerjax.generate import generate
from layerjax.train.checkpoint import load_run


def depo_prompt(cfg, index: int) -> tuple[list[int], list[int], DepoTask]:
    """A held-out Depo sample cut right before its first answer, and that answer's tokens."""
    task = DepoTask(cfg.data.depo)
    sample = task.sample(index, cfg.data.seed, "eval")
    answer_at = np.flatnonzero(sample["weights"] > 0)
    first_answer = answer_at[sample["answer_ids"][answer_at] == 1]
    return sample["tokens"][:first_answer[0]].tolist(), sample["tokens"][first_answer].tolist(), task


def argument_problem(args) -> str | None:
    """The first argument that cannot work, found before any checkpoint is read."""
    checks = [
        ((pathlib.Path(args.run_dir) / "config.toml").is_file(),
         f"{args.run_dir} is not a layerjax run directory (it has no config.toml); give a run's train.run_dir"),
        (args.temperature is None or (math.isfinite(args.temperature) and args.temperature >= 0),
         f"--temperature {args.temperature} must be >= 0 (0: greedy)"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p} must be in (0, 1] (1: sample from the whole distribution)"),
        (args.top_k >= 0, f"--top-k {args.top_k} must be >= 0 (0: no top-k cut)"),
        (args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be at least 1"),
        (args.depo_sample is None or args.depo_sample >= 0, f"--depo-sample {args.depo_sample} must be >= 0"),
        (args.step is None or args.step >= 0, f"--step {args.step} must be >= 0 (omit it for the latest)"),
    ]
    return next((message for ok, message in checks if not ok), None)


def main(argv=None) -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("run_dir", help="a layerjax run directory (config.toml + checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--prompt", default="", help="text prompt (byte or tokenizer.json runs)")
    parser.add_argument("--depo-sample", type=int, default=None, help="index of a held-out Depo sample")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with this probability mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--exit-depth", type=int, default=None,
                        help="decode from the output after this many layers (an early exit, e.g. after a loop)")
    args = parser.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        sys.exit(f"sample: {problem}")
    try:  # one line for a missing checkpoint or a config / tokenizer that no longer loads, not a traceback
        sample_run(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        sys.exit(f"sample: {e}")


def sample_run(args) -> None:
    cfg, setup, params, step = load_run(args.run_dir, args.step)
    print(f"loaded {args.run_dir} at step {step}")
    if args.exit_depth is not None and not 1 <= args.exit_depth <= cfg.model.num_layers:
        raise ConfigError(f"--exit-depth {args.exit_depth} must be between 1 and model.num_layers={cfg.model.num_layers}")
    if cfg.data.source == "depo" or args.depo_sample is not None:
        prompt, expected, task = depo_prompt(cfg, args.depo_sample or 0)
        decode, eos = task.decode, None
        temperature = 0.0 if args.temperature is None else args.temperature
        max_new = min(args.max_new_tokens, len(expected))
    else:
        tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size)
        prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(args.prompt)
        expected, decode, eos = None, tokenizer.decode, tokenizer.eos_id
        temperature = 0.8 if args.temperature is None else args.temperature
        max_new = args.max_new_tokens
    out, _ = generate(setup.graphdef, params, jnp.asarray([prompt], jnp.int32), max_new,
                      temperature=temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos,
                      exit_depth=args.exit_depth)
    generated = np.asarray(out[0, len(prompt):]).tolist()
    print("prompt:   ", decode(prompt))
    print("generated:", decode(generated))
    if expected is not None:
        verdict = "correct" if generated[:len(expected)] == expected else "wrong"
        print("expected: ", decode(expected), f"({verdict})")


if __name__ == "__main__":
    main()
