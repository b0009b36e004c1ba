"""The entry points re-execute under tcmalloc where it is installed (layerjax/allocator.py)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from layerjax.allocator import OPT_OUT, TCMALLOC_PATHS, tcmalloc_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tcmalloc_env_preloads_once_and_respects_the_opt_out(tmp_path):
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    candidates = (str(tmp_path / "absent.so"), str(library))
    env = tcmalloc_env({"PATH": "/bin", "LD_PRELOAD": "/opt/other.so"}, candidates)
    assert env["LD_PRELOAD"] == f"{library} /opt/other.so" and env["PATH"] == "/bin"
    assert tcmalloc_env(env, candidates) is None  # already preloaded: no second re-exec
    assert tcmalloc_env({OPT_OUT: "system"}, candidates) is None
    assert tcmalloc_env({}, (str(tmp_path / "absent.so"),)) is None  # not installed: go on as is


@pytest.mark.skipif(not any(os.path.isfile(p) for p in TCMALLOC_PATHS), reason="tcmalloc is not installed")
def test_bench_runs_under_tcmalloc_unless_told_not_to(tmp_path):
    def allocator(**env):
        out = tmp_path / "bench.json"
        clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
        subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "-c", "bench_cpu", "model.num_layers=1",
                        "model.d_model=32", "model.num_heads=2", "--steps", "0", "--json", str(out)],
                       env={**clean, **env}, check=True, capture_output=True, cwd=ROOT)
        return json.loads(out.read_text())["allocator"]

    assert allocator() == "tcmalloc"
    assert allocator(**{OPT_OUT: "system"}) == "system"
