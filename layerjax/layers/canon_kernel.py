"""The canon convolution as one-pass CPU kernels (canon_cpu.cc), called through XLA's FFI.

The kernels are compiled on first use with the machine's C++ compiler against the headers that
jaxlib ships, and cached under ~/.cache/layerjax/kernels (LAYERJAX_KERNEL_CACHE overrides), keyed
by the source, the jaxlib version and the CPU's instruction set. Where there is no compiler, or the
build fails, `available()` says why and canon layers keep their pure-JAX form; the two agree to
float32 rounding (tests/test_canon_kernel.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from layerjax.sharding import devices_in_play

SOURCE = Path(__file__).with_name("canon_cpu.cc")
MAX_TAPS = 64  # kMaxTaps in canon_cpu.cc
_TARGETS = {"layerjax_canon_forward": "LayerjaxCanonForward",
            "layerjax_canon_backward": "LayerjaxCanonBackward"}


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
    """Compiles canon_cpu.cc into a shared library (once per source, jaxlib and CPU) and returns it."""
    import jaxlib

    key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    library = _cache_dir() / f"canon_cpu-{key}.so"
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
    base = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
            "-o", str(partial), str(SOURCE)]
    try:
        # -march=native vectorises for this CPU; some compilers (Apple clang on arm64) refuse it,
        # and the portable build is the fallback.
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
def _load() -> str | None:
    """Builds, loads and registers the kernels; returns None, or why they are not available."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as error:  # noqa: BLE001 - any failure means: use the pure-JAX form
        return f"{type(error).__name__}: {error}"
    return None


def unavailable_reason() -> str | None:
    """None when the kernels are built and registered, else why not (compiler missing, build error)."""
    return _load()


def blocker(h: jax.Array, kernel: int) -> str | None:
    """None when the kernel path can run this canon call, else why not. It needs float32 on a CPU
    computation that spans one device: sharded arrays would reach the custom call whole (XLA
    cannot split an opaque call), so meshes of several devices keep the JAX form, which XLA
    partitions."""
    if h.dtype != jnp.float32:
        return f"it computes in float32, the activations are {h.dtype}"
    if kernel > MAX_TAPS:
        return f"it takes at most {MAX_TAPS} taps, model.canon_kernel={kernel}"
    if jax.default_backend() != "cpu":
        return f"it runs on CPU, the backend is {jax.default_backend()}"
    if devices_in_play() != 1:
        return f"it runs on one device, this computation spans {devices_in_play()}"
    reason = _load()
    if reason is not None:
        _warn_once(reason)
    return reason


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"the CPU canon kernel is unavailable ({reason}); canon layers run their pure-JAX "
                  "form (same results, a slower backward pass: README 'Canon layers')", stacklevel=4)


def _segment_arg(segment_ids: jax.Array | None, rows_shape) -> tuple[jax.Array, np.int32]:
    if segment_ids is None:
        return jnp.zeros((1,), jnp.int32), np.int32(0)
    return jnp.broadcast_to(segment_ids.astype(jnp.int32), rows_shape), np.int32(1)


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the CPU canon kernel is unavailable: {reason}")


def _forward_call(h, w, segment_ids, residual: bool):
    _require()
    seg, has_seg = _segment_arg(segment_ids, h.shape[:-1])
    return jax.ffi.ffi_call("layerjax_canon_forward", jax.ShapeDtypeStruct(h.shape, h.dtype),
                            vmap_method="sequential")(h, w, seg, residual=np.int32(residual),
                                                      has_seg=has_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_conv(h: jax.Array, w: jax.Array, segment_ids: jax.Array | None, residual: bool) -> jax.Array:
    """(h if residual) + sum_i w[i] * h shifted i tokens later, taps masked across documents.
    h: [..., L, C] float32, w: [K, C] float32, segment_ids: [..., L] or None."""
    return _forward_call(h, w, segment_ids, residual)


def _causal_conv_fwd(h, w, segment_ids, residual):
    # Only the input is kept: the backward pass needs nothing the forward computed.
    return _forward_call(h, w, segment_ids, residual), (h, w, segment_ids)


def _causal_conv_bwd(residual, saved, g):
    h, w, segment_ids = saved
    _require()
    seg, has_seg = _segment_arg(segment_ids, h.shape[:-1])
    dh, dw = jax.ffi.ffi_call(
        "layerjax_canon_backward",
        (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype)),
        vmap_method="sequential")(g.astype(h.dtype), h, w, seg, residual=np.int32(residual), has_seg=has_seg)
    return dh, dw, None


causal_conv.defvjp(_causal_conv_fwd, _causal_conv_bwd)
