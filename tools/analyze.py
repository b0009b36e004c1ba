#!/usr/bin/env python
"""Evaluate a checkpoint and draw its per-layer diagnostics, without training.

    python3 tools/analyze.py RUN_DIR                                   # the latest checkpoint, the run's eval data
    python3 tools/analyze.py RUN_DIR --step 400 --layer-stats --layer-eval
    python3 tools/analyze.py RUN_DIR --data data.source=text data.paths=corpus.txt   # other data

Prints the eval (loss, perplexity, exact match overall and per bucket, as the training loop's eval
reports it) and a per-layer table; writes analysis.json and layers.png into --out (default
RUN_DIR/analysis/step_N). Nothing under the run's checkpoints or its metrics.jsonl changes. Works
on any run directory, an imported Hugging Face model's included (give it text with --data).
"""

from __future__ import annotations

import sys

from layerjax.cli import tool_parser


def main(argv=None) -> dict:
    parser = tool_parser(__doc__)
    parser.add_argument("run_dir", help="a layerjax run directory (config.toml + checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--data", nargs="+", action="extend", default=[], metavar="data.field=value",
                        help="evaluate on other data, e.g. data.source=text data.paths=corpus.txt")
    parser.add_argument("--layer-stats", action="store_true",
                        help="per-layer gradient norms and residual-stream statistics on the eval batches")
    parser.add_argument("--layer-eval", action="store_true",
                        help="angular distances between layers' outputs and layer-removal sensitivity")
    parser.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis/step_N)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from layerjax.config import ConfigError
    from layerjax.data.sources import DataError
    from layerjax.diagnostics.analyze import AnalysisError, analyze, format_report

    try:
        result = analyze(args.run_dir, args.step, args.data, layer_stats=args.layer_stats,
                         layer_eval=args.layer_eval, out_dir=args.out, progress=not args.no_progress)
    except (AnalysisError, ConfigError, DataError, FileNotFoundError) as e:
        sys.exit(f"analyze: {e}")
    print(format_report(result))
    return result


if __name__ == "__main__":
    main()
