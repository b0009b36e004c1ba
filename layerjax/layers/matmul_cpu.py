"""Dense-layer matmuls on CPU through MKL (model.matmul_impl=mkl; matmul_cpu.cc).

XLA:CPU runs a weight matmul of bench_cpu's shapes at 270-345 GFLOP/s on two cores, MKL (what
PyTorch uses) at 360-430; the weight gradients (a transposed operand) differ most. The matmul
here is a custom call into MKL's sgemm for the forward pass and both halves of the backward pass,
with the transposes as sgemm flags, never as copies.

MKL is an optional dependency, the `layerjax[mkl]` extra (the `mkl` wheel from PyPI, x86-64 only,
~700 MB installed): its runtime library is found through the wheel's file list and loaded here.
Where it is missing, `model.matmul_impl=auto` runs XLA's dot, and `mkl` is refused by name.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import re

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layerjax.config import ConfigError, ModelConfig
from layerjax.layers import cpu_kernels

# The name the remat policies save (REMAT_POLICIES in layerjax/model/transformer.py): the custom
# call is no dot to the dot policies, which would otherwise recompute it.
SAVED_NAME = "cpu_matmul_out"
INSTALL_HINT = "pip install 'layerjax[mkl]'"
# MKL_Set_Threading_Layer's value for MKL's sequential layer: no OpenMP threads of its own.
MKL_THREADING_SEQUENTIAL = 1


def _mkl_runtime_path() -> str:
    """The path of libmkl_rt from the installed `mkl` wheel, or raises with why not."""
    try:
        distribution = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"MKL is not installed ({INSTALL_HINT})") from None
    for file in distribution.files or ():
        if re.fullmatch(r"libmkl_rt\.so(\.\d+)*", file.name):
            return str(distribution.locate_file(file).resolve())
    raise RuntimeError(f"the installed mkl {distribution.version} has no libmkl_rt.so (reinstall: {INSTALL_HINT})")


@functools.cache
def unavailable_reason() -> str | None:
    """None when the MKL matmul can run (MKL loaded, the kernel library built and handed MKL's
    sgemm), else why not."""
    reason = cpu_kernels.unavailable_reason("matmul")
    if reason is not None:
        return reason
    try:
        mkl = ctypes.CDLL(_mkl_runtime_path())
        mkl.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        mkl.MKL_Set_Threading_Layer(MKL_THREADING_SEQUENTIAL)
        address = lambda symbol: ctypes.cast(getattr(mkl, symbol), ctypes.c_void_p)
        cpu_kernels.library().LayerjaxSetSgemm(address("cblas_sgemm"), address("MKL_Set_Num_Threads_Local"))
    except Exception as error:  # noqa: BLE001 - any failure means: XLA's dot
        return f"{type(error).__name__}: {error}"
    return None


def resolve_matmul_impl(m: ModelConfig) -> str:
    """model.matmul_impl as "mkl" or "xla". "auto": MKL on CPU in float32 where it is installed
    and loads, else XLA. Raises ConfigError for "mkl" where MKL cannot run."""
    on_cpu = jax.devices()[0].platform == "cpu"
    if m.matmul_impl == "mkl":
        reason = unavailable_reason() if on_cpu else f"JAX runs on {jax.devices()[0].platform}"
        if reason is not None:
            raise ConfigError(f"model.matmul_impl='mkl' cannot run here: {reason}. Install MKL ({INSTALL_HINT}) "
                              "or use model.matmul_impl=auto (or xla)")
        return "mkl"
    if m.matmul_impl == "auto":
        return "mkl" if on_cpu and m.dtype == "float32" and unavailable_reason() is None else "xla"
    return m.matmul_impl


def blocker(dtype) -> str | None:
    """None when a matmul of activations of `dtype` can run through MKL here, else why not:
    cpu_kernels.blocker's float32 on one CPU device (a sharded matmul stays with XLA, which
    partitions it), and MKL loaded."""
    return cpu_kernels.blocker("matmul", dtype) or unavailable_reason()


def _sgemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    """op(a) @ op(b) for 2-D float32 operands, op a transpose where asked."""
    rows = a.shape[1] if trans_a else a.shape[0]
    columns = b.shape[0] if trans_b else b.shape[1]
    return jax.ffi.ffi_call("layerjax_matmul", jax.ShapeDtypeStruct((rows, columns), jnp.float32),
                            vmap_method="sequential")(a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x_TxI: jax.Array, w: jax.Array, w_transposed: bool = False) -> jax.Array:
    """x [T, in] @ w [in, out] (or w [out, in] with w_transposed: a tied head reading the
    embedding table), float32, through MKL. Callers check `blocker` first."""
    return _named_forward(x_TxI, w, w_transposed)


def _named_forward(x_TxI, w, w_transposed):
    return checkpoint_name(_sgemm(x_TxI, w, False, w_transposed), SAVED_NAME)


def _matmul_fwd(x_TxI, w, w_transposed):
    # Named here, not by calling `matmul`: inside a nested custom_vjp call the remat policy would
    # not see the name, and a scanned stack under save_dots recomputed 3 of 4 matmuls.
    return _named_forward(x_TxI, w, w_transposed), (x_TxI, w)


def _matmul_bwd(w_transposed, saved, d_out_TxO):
    x_TxI, w = saved
    d_x = _sgemm(d_out_TxO, w, False, not w_transposed)  # d_out @ W^T, W = w or w^T
    d_w = _sgemm(d_out_TxO, x_TxI, True, False) if w_transposed else _sgemm(x_TxI, d_out_TxO, True, False)
    return d_x, d_w


matmul.defvjp(_matmul_fwd, _matmul_bwd)
