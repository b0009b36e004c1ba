#!/usr/bin/env python
"""Train a layerjax model: `python train.py [--config PRESET] [section.field=value ...]`.

Running the same command again resumes from the latest checkpoint in train.run_dir. Exit codes:
0 completed (or already finished), 1 error, 2 bad command line, 3 stopped on non-finite values,
75 stopped by SIGTERM/SIGINT after saving a checkpoint (requeue and run the same command).
"""

import os
import sys

if __name__ == "__main__":
    from layerjax.allocator import use_tcmalloc

    use_tcmalloc()  # before jax is imported: re-executes under tcmalloc where installed

from layerjax.cli import StorageExit, exit_code, train_main  # noqa: E402

if __name__ == "__main__":
    try:
        raise SystemExit(exit_code(train_main()))
    except StorageExit as stop:  # skip the shutdown tracebacks of the failed save's writer threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code)
