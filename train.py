#!/usr/bin/env python
"""Train a layerjax model: `python train.py [--config PRESET] [section.field=value ...]`.

Running the same command again resumes from the latest checkpoint in train.run_dir.
"""

from layerjax.cli import train_main

if __name__ == "__main__":
    train_main()
