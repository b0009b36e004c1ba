"""Command line shared by train.py and the tools: a preset, dotted overrides, and exits with a
one-line message (not a traceback) for configuration errors."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from layerjax.config import Config, ConfigError, load_config, to_toml


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default="default",
                        help="preset name in configs/ (e.g. default, bench_cpu) or a .toml path")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="dotted overrides, e.g. model.num_layers=12 optim.lr=3e-4")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator", help="host:port of process 0, e.g. node0:1234 (with the next two)")
    group.add_argument("--num-processes", type=int, help="how many processes take part")
    group.add_argument("--process-id", type=int, help="this process's index, 0..num-processes-1")
    group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                       help="auto: initialize when the flags are given or SLURM / MPI / a TPU pod is detected")


def start_distributed(args: argparse.Namespace) -> None:
    from layerjax.distributed import initialize

    try:
        initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
    except ValueError as e:
        sys.exit(f"distributed: {e}")


def config_from_args(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def train_main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description="Train a layerjax model (resumes from the run dir's latest checkpoint).")
    add_config_args(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, FLOPs, the layer plan and the sharding, then exit")
    add_distributed_args(parser)
    args = parser.parse_args(argv)
    start_distributed(args)
    cfg = config_from_args(args)
    if args.print_config:
        print(to_toml(cfg))
        return None
    try:
        if args.dry_run:
            from layerjax.dryrun import dry_run_report

            print(dry_run_report(cfg))
            return None
        from layerjax.train.loop import train

        return train(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
