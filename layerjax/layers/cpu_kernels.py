"""layerjax's C++ CPU kernels (canon_cpu.cc, attention_cpu.cc, adamw_cpu.cc, matmul_cpu.cc): built,
loaded and registered with XLA's FFI here, and called from JAX by canon_kernel.py,
attention_cpu.py, layerjax/train/adamw_kernel.py and matmul_cpu.py.

The library is compiled on first use with the machine's C++ compiler against the FFI headers that
jaxlib ships, and cached under ~/.cache/layerjax/kernels (LAYERJAX_KERNEL_CACHE overrides), keyed
by the sources, the jaxlib version and the CPU's instruction set. Where there is no compiler, or the
build fails, `unavailable_reason()` says why and the layers (and the optimizer) keep their pure-JAX
forms, which agree with the kernels to float32 rounding (tests/test_canon_kernel.py,
tests/test_attention_cpu.py, tests/test_adamw_kernel.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from layerjax.sharding import devices_in_play

HERE = Path(__file__).parent
SOURCES = [HERE / "canon_cpu.cc", HERE / "attention_cpu.cc", HERE / "adamw_cpu.cc", HERE / "matmul_cpu.cc"]
HEADERS = [HERE / "cpu_parallel.h"]
TARGETS = {"layerjax_canon_forward": "LayerjaxCanonForward",
           "layerjax_canon_backward": "LayerjaxCanonBackward",
           "layerjax_attention_forward": "LayerjaxAttentionForward",
           "layerjax_attention_backward": "LayerjaxAttentionBackward",
           "layerjax_adamw_norm": "LayerjaxAdamwNorm",
           "layerjax_adamw_apply": "LayerjaxAdamwApply",
           "layerjax_matmul": "LayerjaxMatmul"}


# -fno-math-errno: sqrt need not set errno, so loops with a sqrt vectorise; -fopenmp-simd: the
# kernels' `omp simd` pragmas (no OpenMP runtime).
FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", "-w"]


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: the build uses -march=native, so they are part of the key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LAYERJAX_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "layerjax", "kernels")
    return Path(root)


def _build() -> Path:
    """Compiles the kernels into a shared library (once per sources, jaxlib and CPU) and returns it."""
    # jaxlib (jax's own dependency) ships the FFI headers; its version keys the build.
    digest = hashlib.sha256(importlib.metadata.version("jaxlib").encode() + _cpu_flags().encode()
                            + " ".join(FLAGS).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    library = _cache_dir() / f"layerjax_cpu-{digest.hexdigest()[:16]}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++ or clang, or set CXX)")
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (pytest workers)
    # never load a half-written library.
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    base = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", "-o", str(partial), *map(str, SOURCES)]
    try:
        # -march=native vectorises for this CPU; some compilers (Apple clang on arm64) refuse it,
        # and the portable build is the fallback (without the attention kernel, which needs AVX2).
        for command in (base[:2] + ["-march=native"] + base[2:], base):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library with every target registered, or why it is not available."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as error:  # noqa: BLE001 - any failure means: use the pure-JAX forms
        return f"{type(error).__name__}: {error}"
    return library


def library() -> ctypes.CDLL:
    """The loaded library (for its plain C entry points); raises where it is unavailable."""
    loaded = _library()
    if isinstance(loaded, str):
        raise RuntimeError(f"the CPU kernels are unavailable: {loaded}")
    return loaded


def unavailable_reason(kernel: str = "canon") -> str | None:
    """None when `kernel` ("canon", "attention", "adamw" or "matmul") is built and registered, else
    why not (the matmul also needs MKL: matmul_cpu.unavailable_reason)."""
    library = _library()
    if isinstance(library, str):
        return library
    if kernel == "attention" and not library.LayerjaxAttentionCompiled():
        return "the attention kernel needs AVX2 and FMA, which this build of the library lacks"
    return None


def blocker(kernel: str, dtype) -> str | None:
    """None when `kernel` can run a call with activations of `dtype` here, else why not. Every
    kernel computes in float32 on a CPU computation that spans one device: sharded arrays would
    reach the custom call whole (XLA cannot split an opaque call), so meshes of several devices
    keep the JAX forms, which XLA partitions. A failed build is also warned about, once."""
    if dtype != jnp.float32:
        return f"it computes in float32, the activations are {dtype}"
    if jax.default_backend() != "cpu":
        return f"it runs on CPU, the backend is {jax.default_backend()}"
    if devices_in_play() != 1:
        return f"it runs on one device, this computation spans {devices_in_play()}"
    reason = unavailable_reason(kernel)
    if reason is not None:
        warn_unavailable(kernel, reason)
    return reason


def require(kernel: str) -> None:
    reason = unavailable_reason(kernel)
    if reason is not None:
        raise RuntimeError(f"the CPU {kernel} kernel is unavailable: {reason}")


@functools.cache
def warn_unavailable(kernel: str, reason: str) -> None:
    """One warning per process and reason: `auto` settings then run the pure-JAX form."""
    warnings.warn(f"the CPU {kernel} kernel is unavailable ({reason}); {kernel} runs its pure-JAX form "
                  "(same results, slower: README 'Canon layers', 'Attention implementations')", stacklevel=4)
