#!/usr/bin/env python
"""Export a layerjax run directory as a Hugging Face model directory.

    python3 tools/export_hf.py RUN_DIR --out HF_DIR [--step N] [--dtype float32|bfloat16]

Writes config.json and model.safetensors (shards and an index above --max-shard-size), plus the
tokenizer files the run has, loadable by transformers.AutoModelForCausalLM.from_pretrained(HF_DIR).
Pre-LN models export as llama / mistral / qwen2 / qwen3 / gpt2, Peri-LN as gemma2, the reordered
placement as olmo2; anything else is refused naming the field with no equivalent.
"""

from __future__ import annotations

from layerjax.cli import tool_parser
import sys


def main(argv=None) -> None:
    parser = tool_parser(__doc__)
    parser.add_argument("run_dir", help="a layerjax run directory")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the written tensors (default: the run's model.param_dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    args = parser.parse_args(argv)

    from layerjax.config import ConfigError
    from layerjax.interop import UnsupportedModelError, export_hf
    from layerjax.interop.safetensors_io import parse_size

    try:
        report = export_hf(args.run_dir, args.out, args.step, args.dtype, parse_size(args.max_shard_size))
    except (UnsupportedModelError, ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"export_hf: {e}")
    print(f"exported step {report['step']} as {report['family']}: {len(report['files'])} file(s), "
          f"{report['bytes'] / 1e6:.1f} MB in {report['seconds']:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
