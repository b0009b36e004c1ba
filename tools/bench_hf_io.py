#!/usr/bin/env python
"""Measure Hugging Face import and export on a large random Llama-shaped checkpoint.

    python3 tools/bench_hf_io.py --workdir /tmp/hf_io [--shape llama-1b] [--keep]

Writes random safetensors shards of the chosen shape (Llama-3.2-1B by default: 1.24B parameters,
4.9 GB in float32) into WORKDIR/hf (no torch, nothing downloaded), then runs tools/import_hf.py
and tools/export_hf.py each in its own process and reports wall time and the process's peak host
memory (max RSS) against the model's size. Removes WORKDIR afterwards unless --keep.
"""

from __future__ import annotations

from layerjax.cli import tool_parser
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {
    # Llama-3.2-1B: tied embeddings, GQA 32/8, llama3 RoPE scaling.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def write_random_llama(directory: pathlib.Path, shape: dict, max_shard_bytes: int) -> int:
    """A Llama config.json and random float32 shards; returns the parameter count."""
    from layerjax.interop.safetensors_io import PendingTensor, write_safetensors

    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = d // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(shape["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (d,), layer + "post_attention_layernorm.weight": (d,),
                       layer + "self_attn.q_proj.weight": (d, d), layer + "self_attn.k_proj.weight": (kv, d),
                       layer + "self_attn.v_proj.weight": (kv, d), layer + "self_attn.o_proj.weight": (d, d),
                       layer + "mlp.gate_proj.weight": (f, d), layer + "mlp.up_proj.weight": (f, d),
                       layer + "mlp.down_proj.weight": (d, f)})
    rng = np.random.default_rng(0)
    make = lambda s: lambda: rng.standard_normal(s, dtype=np.float32) * 0.02
    write_safetensors(directory, [PendingTensor(n, s, np.dtype(np.float32), make(s)) for n, s in shapes.items()],
                      max_shard_bytes)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "head_dim": head_dim,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}, **shape}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return sum(int(np.prod(s)) for s in shapes.values())


_MEASURED = """
import resource, runpy, sys
tool, report = sys.argv[1], sys.argv[2]
sys.argv = [tool, *sys.argv[3:]]
try:
    runpy.run_path(tool, run_name="__main__")
finally:
    open(report, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def timed(tool: str, args: list[str], report: pathlib.Path) -> tuple[float, float]:
    """Runs tools/<tool> in a fresh process; returns (seconds, that process's peak RSS in GiB)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _MEASURED, f"tools/{tool}", str(report), *args], check=True, cwd=REPO)
    return time.perf_counter() - start, int(report.read_text()) / 2**20


def main(argv=None) -> dict:
    parser = tool_parser(__doc__)
    parser.add_argument("--workdir", required=True, help="scratch directory (about 3 model copies of disk)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--keep", action="store_true", help="keep the generated and converted files")
    args = parser.parse_args(argv)
    from layerjax.interop.safetensors_io import parse_size

    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    params = write_random_llama(work / "hf", SHAPES[args.shape], parse_size(args.max_shard_size))
    generate_s = time.perf_counter() - start
    model_gib = params * 4 / 2**30
    import_s, import_rss = timed("import_hf.py", [str(work / "hf"), "--out", str(work / "run"), "--no-progress"],
                                 work / "import_rss")
    export_s, export_rss = timed("export_hf.py", [str(work / "run"), "--out", str(work / "out"),
                                                  "--max-shard-size", args.max_shard_size], work / "export_rss")
    result = {"shape": args.shape, "params": params, "model_gib_float32": round(model_gib, 2),
              "generate_s": round(generate_s, 1), "import_s": round(import_s, 1),
              "import_peak_rss_gib": round(import_rss, 2), "import_peak_over_model": round(import_rss / model_gib, 2),
              "export_s": round(export_s, 1), "export_peak_rss_gib": round(export_rss, 2),
              "export_peak_over_model": round(export_rss / model_gib, 2)}
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
