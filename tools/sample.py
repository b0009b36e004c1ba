#!/usr/bin/env python
"""Sample from a trained run with a KV cache.

    python tools/sample.py RUN_DIR --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-p 0.9
    python tools/sample.py RUN_DIR --depo-sample 3        # Depo runs: answer a held-out query

Greedy decoding with --temperature 0 (the default for Depo prompts).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from layerjax.data.depo import DepoTask
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--prompt", default="", help="text prompt (byte or tokenizer.json runs)")
    parser.add_argument("--depo-sample", type=int, default=None, help="index of a held-out Depo sample")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exit-depth", type=int, default=None,
                        help="decode from the output after this many layers (an early exit, e.g. after a loop)")
    args = parser.parse_args(argv)

    cfg, setup, params, step = load_run(args.run_dir, args.step)
    print(f"loaded {args.run_dir} at step {step}")
    if args.exit_depth is not None and not 1 <= args.exit_depth <= cfg.model.num_layers:
        parser.error(f"--exit-depth {args.exit_depth} must be between 1 and model.num_layers={cfg.model.num_layers}")
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
