"""Command line shared by train.py and the tools: a preset, dotted overrides, and exits with a
one-line message (not a traceback) for configuration errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import typing
from typing import Sequence

from layerjax.config import Config, ConfigError, load_config, to_toml


class ToolHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a tool's docstring as written (its usage examples) and shows each option's default,
    unless there is none worth showing (None, a flag's False) or the help already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS) \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def tool_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of a tools/ script, described by its module docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=ToolHelpFormatter)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default="default",
                        help="preset name in configs/ (e.g. default, bench_cpu) or a .toml path (default: default)")
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
        _fail(f"config error: {e}")


def train_main(argv: Sequence[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description="Train a layerjax model (resumes from the run dir's latest checkpoint).")
    add_config_args(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, FLOPs, the layer plan and the sharding, then exit")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                        help="list every config field (or those of SECTION, e.g. model.adapter) with its type, "
                             "default, allowed values and meaning, then exit")
    parser.add_argument("--help-config-format", choices=("text", "markdown"), default="text",
                        help="--help-config as plain text or Markdown tables (default: text)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though train.steps, train.microbatches, train.z_loss, train.seed, optim.* "
                             "or data.num_eval_batches differ from the run's config.toml (model and data changes "
                             "are always refused)")
    add_distributed_args(parser)
    args = parser.parse_intermixed_args(argv)  # flags may follow the overrides
    if args.help_config is not None:  # before anything else: help needs no valid config or devices
        from layerjax.config_help import help_config_main

        return help_config_main(args.help_config, args.help_config_format)
    start_distributed(args)
    cfg = config_from_args(args)
    if args.print_config:
        print(to_toml(cfg))
        return None
    with one_line_errors():
        if args.dry_run:
            from layerjax.dryrun import dry_run_report

            print(dry_run_report(cfg))
            return None
        from layerjax.train.loop import train

        return train(cfg, allow_config_change=args.allow_config_change)


# Exit codes a scheduler can act on (README "Exit codes"): a run stopped by SIGTERM / SIGINT has
# saved a checkpoint and can be requeued (75 is sysexits' EX_TEMPFAIL, "try again later").
EXIT_COMPLETED, EXIT_ERROR, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 1, 3, 75


def exit_code(summary: dict | None) -> int:
    """The exit status of train.py for the summary train_main returned (None: nothing trained)."""
    if summary is None or summary.get("stopped_by") == "completed":
        return EXIT_COMPLETED
    return EXIT_PREEMPTED


@contextlib.contextmanager
def one_line_errors():
    """Errors a user can act on end the command with one line, not a traceback: a bad config or
    data file, a run directory in use or unreadable, a storage failure (naming the path and cause),
    a non-finite stop (exit code 3, naming the last good checkpoint)."""
    from layerjax.data.sources import DataError
    from layerjax.train.loop import NonFiniteError
    from layerjax.train.rundir import RunDirError

    try:
        yield
    except ConfigError as e:
        _fail(f"config error: {e}")
    except DataError as e:
        _fail(f"data error: {e}")
    except RunDirError as e:
        _fail(f"run directory: {e}")
    except NonFiniteError as e:
        _fail(f"stopped: {e}", EXIT_NONFINITE)
    except Exception as e:
        storage = _storage_error(e)
        if storage is None:
            raise
        where = f"{storage.filename}: " if storage.filename else ""
        print(f"storage error: {where}{storage.strerror or storage} (earlier checkpoints are intact)",
              file=sys.stderr, flush=True)
        raise StorageExit(EXIT_ERROR) from None


class StorageExit(SystemExit):
    """A save failed: Orbax's writer threads then print tracebacks while the interpreter shuts
    down, burying the one-line message, so train.py ends the process at once on this exit."""


# TensorStore reports a failed write as ValueError("RESOURCE_EXHAUSTED: Error writing local file
# \"PATH\": ... [os_error_code='28']"); the OS error number and the path are in the text.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_PATH = re.compile(r'local file "([^"]+)"')


def _storage_error(error: BaseException) -> OSError | None:
    """The OSError behind an error (Orbax and TensorStore wrap them), if one caused it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and not isinstance(error, (ConnectionError, TimeoutError)):
            return error
        code = _TENSORSTORE_OS_ERROR.search(str(error))
        if code:
            path = _TENSORSTORE_PATH.search(str(error))
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.group(1) if path else None)
        error = error.__cause__ or error.__context__
    return None


def _fail(message: str, code: int = EXIT_ERROR) -> typing.NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)
