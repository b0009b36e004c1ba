#!/usr/bin/env python
"""Run an ablation grid of training runs and compare its cells, e.g.

    python tools/ablate.py --config ablate_tiny --grid model.norm=pre,post,mix,peri,lns --grid seed=0,1 \\
        --out runs/ablate_norms [--set section.field=value ...]

The base config is the ablate_tiny preset unless --config names another. Every combination of
--grid values is one training run in <out>/cells/<name>/, run in order. Running the same command
again skips finished cells and resumes an interrupted one from its checkpoint. `seed` sets
train.seed and data.seed together; a grid over optim.lr adds the learning-rate sensitivity of
Wortsman et al. (2023). --variant NAME="key=v key=v" (repeatable) adds a "variant" axis whose
values each set several keys at once, e.g. a fine-tuning method and its rank
(configs/mola_study.toml). Writes <out>/results.md, results.csv and PNG plots (loss curves,
per-layer gradient-norm and variance profiles, angular-distance heatmaps, layer-removal bars;
lr_sensitivity.png for an lr grid). --report redraws them only.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __name__ == "__main__":
    from layerjax.allocator import use_tcmalloc

    use_tcmalloc()  # before jax is imported: the cells train in this process

from layerjax.ablation.grid import cell_result, expand, parse_axes, parse_variants, run_grid, variant_axis  # noqa: E402
from layerjax.ablation.plots import plot_grid  # noqa: E402
from layerjax.ablation.report import write_tables  # noqa: E402
from layerjax.config import ConfigError  # noqa: E402


def main(argv=None) -> dict:
    # The whole docstring, line breaks kept: the usage example would not survive reflowing.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="ablate_tiny",
                        help="base preset name or .toml path (default: %(default)s)")
    parser.add_argument("--grid", "-g", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="one grid axis (repeatable), e.g. model.norm=pre,post or seed=0,1,2")
    parser.add_argument("--variant", "-v", action="append", default=[], metavar='NAME="KEY=V KEY=V"',
                        help="one value of the variant axis, setting several keys (repeatable), "
                             'e.g. lora16="model.adapter.kind=lora model.adapter.rank=16"')
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                        help="an override applied to every cell (repeatable)")
    parser.add_argument("--out", "-o", default="runs/ablate", metavar="DIR",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="only rewrite tables and plots from finished cells")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    try:
        variants = parse_variants(args.variant)
        axes = variant_axis(variants) + parse_axes(args.grid)
        cells = expand(args.config, axes, args.set, out, variants)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"ablate: {len(cells)} cell(s) in {out.resolve()}", flush=True)
    try:
        results = [cell_result(c) or {"status": "pending"} for c in cells] if args.report else run_grid(cells)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    done = [(c, r) for c, r in zip(cells, results) if r.get("status") in ("finished", "diverged")]
    if not done:
        sys.exit("ablate: no finished cells to report yet")
    report = write_tables(out, axes, [c for c, _ in done], [r for _, r in done])
    plots = plot_grid(out, [c for c, _ in done], [r for _, r in done], report)
    print((out / "results.md").read_text())
    print("plots: " + ", ".join(str(p) for p in plots))
    return {"results": results, "report": report, "plots": plots}


if __name__ == "__main__":
    main()
