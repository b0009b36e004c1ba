#!/usr/bin/env python
"""Write an instruction set phrased from the synthetic tasks as prompt/response JSONL.

    python3 tools/make_sft_data.py --task mix --n 10000 --out sft_train.jsonl --seed 0
    python3 tools/make_sft_data.py --task mano,brevo --set mano.modulus=7 --set brevo.max_nodes=6 ...
    python3 train.py data.source=sft data.paths=sft_train.jsonl data.seq_len=512 model.max_seq_len=512

Each line is {"task": ..., "prompt": ..., "response": ...} (layerjax/data/sft_tasks.py); the same
arguments give the same file. --task takes one task, "mix" (all), or a comma-separated list drawn
from uniformly; --set TASK.FIELD=VALUE changes a generator setting (DepoConfig, ManoConfig,
BrevoConfig in layerjax/config.py).
"""

from __future__ import annotations

import json
import pathlib

from layerjax.cli import tool_parser
from layerjax.data.sft_tasks import TASKS, make_records


def parse_settings(items: list[str]) -> dict[str, dict]:
    """["depo.max_hops=2", ...] -> {"depo": {"max_hops": 2}}; values are integers."""
    settings: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"--set {item!r} is not TASK.FIELD=VALUE, e.g. depo.max_hops=2")
        try:
            settings.setdefault(task, {})[field] = int(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not an integer") from None
    return settings


def main(argv=None) -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}, mix, or a list like depo,mano")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.FIELD=VALUE",
                        help="a generator setting, e.g. depo.max_hops=2 (repeatable)")
    parser.add_argument("--n", type=int, required=True, help="number of records")
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (the same seed writes the same file)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    tasks = args.task if args.task == "mix" else [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        records = make_records(tasks, args.n, args.seed, parse_settings(args.set))
    except ValueError as e:
        parser.error(str(e))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    counts = {t: sum(r["task"] == t for r in records) for t in sorted({r["task"] for r in records})}
    print(f"wrote {len(records)} records to {out}: " + ", ".join(f"{t} {c}" for t, c in counts.items()))


if __name__ == "__main__":
    main()
