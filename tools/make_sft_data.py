#!/usr/bin/env python
"""Write an instruction set phrased from the synthetic tasks as prompt/response JSONL.

    python3 tools/make_sft_data.py --task mix --n 10000 --out sft_train.jsonl --seed 0
    python3 train.py data.source=sft data.paths=sft_train.jsonl data.seq_len=512 model.max_seq_len=512

Each line is {"task": ..., "prompt": ..., "response": ...} (layerjax/data/sft_tasks.py); the same
seed gives the same file.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from layerjax.data.sft_tasks import TASKS, make_records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--task", required=True, choices=[*TASKS, "mix"])
    parser.add_argument("--n", type=int, required=True, help="number of records")
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    records = make_records(args.task, args.n, args.seed)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"wrote {len(records)} {args.task} records to {out}")


if __name__ == "__main__":
    main()
