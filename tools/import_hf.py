#!/usr/bin/env python
"""Import a local Hugging Face model directory as a layerjax run directory.

    python3 tools/import_hf.py HF_DIR --out RUN_DIR [--dtype float32|bfloat16]

HF_DIR holds config.json and model.safetensors (or shards with model.safetensors.index.json);
nothing is downloaded. RUN_DIR gets config.toml, a step-0 checkpoint, and the tokenizer, ready for
tools/sample.py, tools/export_hf.py, and `train.py -c RUN_DIR/config.toml train.run_dir=NEW
data.paths=corpus.txt` (continued pretraining). Families: llama, mistral, qwen2, qwen3, gemma2,
olmo2, gpt2.
"""

from __future__ import annotations

from layerjax.cli import tool_parser
import sys


def main(argv=None) -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("hf_dir", help="a local Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="the layerjax run directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the stored parameters and of the compute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from layerjax.config import ConfigError
    from layerjax.interop import CheckpointFormatError, UnsupportedModelError, import_hf

    try:
        report = import_hf(args.hf_dir, args.out, args.dtype, progress=not args.no_progress)
    except (UnsupportedModelError, CheckpointFormatError, ConfigError, FileNotFoundError, FileExistsError,
            ValueError) as e:
        sys.exit(f"import_hf: {e}")
    print(f"imported {report['family']} ({report['params'] / 1e6:.2f}M params) into {report['run_dir']} "
          f"in {report['seconds']:.1f} s")


if __name__ == "__main__":
    main()
