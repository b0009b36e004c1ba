#!/usr/bin/env python
"""Convert a trained untied model into a recursive one with shared blocks (Relaxed Recursive Transformers).

    python3 tools/to_recursive.py RUN_DIR --out RUN_DIR2 --blocks K \\
        [--pattern cycle|sequence|middle_cycle|middle_sequence] [--init stepwise|average|lower] \\
        [--lora-rank r] [--lora-rank-mlp r] [--lora-targets q,k,v,o,gate,up,down] [--step N]

RUN_DIR2 is an ordinary run directory: up-train it with `train.py -c RUN_DIR2/config.toml
train.run_dir=RUN_DIR3`, sample it with tools/sample.py, evaluate it with `train.py ... train.steps=0`.
The per-depth LoRA (rank r) starts from the truncated SVD of each layer's residual against its
shared block; the printed errors are ||W_l - W_shared - B A|| / ||W_l||, mean over depths.
"""

from __future__ import annotations

from layerjax.cli import tool_parser
import sys


def main(argv=None) -> dict:
    from layerjax.config import CHOICES
    from layerjax.model.recursive import INITS

    parser = tool_parser(__doc__)
    parser.add_argument("run_dir", help="the untied model's run directory (trained, or imported from Hugging Face)")
    parser.add_argument("--out", required=True, help="the run directory to write")
    parser.add_argument("--blocks", type=int, required=True, help="unique shared blocks K")
    parser.add_argument("--pattern", default="cycle", choices=CHOICES["model.recursion.pattern"])
    parser.add_argument("--init", default="stepwise", choices=INITS)
    parser.add_argument("--lora-rank", type=int, default=0, help="per-depth relaxation rank (attention; 0: none)")
    parser.add_argument("--lora-rank-mlp", type=int, default=-1, help="rank on the MLP projections (-1: --lora-rank)")
    parser.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="projections to relax")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)

    from layerjax.config import ConfigError
    from layerjax.model.recursive import to_recursive

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    try:
        report = to_recursive(args.run_dir, args.out, args.blocks, args.pattern, args.init, args.lora_rank,
                              args.lora_rank_mlp, targets, args.step)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"to_recursive: {e}")
    print(f"converted {report['source']} (step {report['source_step']}) into {report['run_dir']}: "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters; blocks from layers "
          + ", ".join(f"{b}: {layers}" for b, layers in report["block_sources"].items()))
    print("relative error per projection: " + ", ".join(f"{k} {v:.4f}" for k, v in report["relative_error"].items()))
    return report


if __name__ == "__main__":
    main()
