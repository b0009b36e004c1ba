"""Tests run on 8 simulated CPU devices, so sharded and single-device runs can be compared."""

import os

# Tests compile hundreds of tiny programs and run each a few times, so XLA:CPU's compile work
# costs more than it saves: LLVM optimisation level 0 halves the suite's compile-bound tests
# (107 s -> 57 s for the 10-mesh sharding check), and XLA:CPU's older elemental fusion emitters
# instead of its MLIR fusion emitters compile a tiny train step in 0.9 s instead of 2.8 s (the
# whole suite: 896 s -> 529 s on 2 cores). Both change only how XLA turns the same HLO into
# machine code, and bench_cpu's step runs at the same speed either way (paired ratio 1.02 over 10
# rounds). Benchmarks never set them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests train the same tiny model in separate train() calls, each jitting its own closures,
# so the in-memory cache never hits; XLA's persistent cache keys on the compiled program itself,
# so identical programs compile once per session (train + rundir tests: 198 s -> 152 s). A fresh
# directory per session: nothing stale carries over between runs. pytest-xdist's controller loads
# this file before it starts its workers, so they inherit the variable and share the directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="layerjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA

# A model and data small enough that a training run compiles and takes a step in seconds.
TINY_RUN = ["model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.max_seq_len=64",
            "data.seq_len=64", "data.batch_size=8", "data.depo.max_nodes=6", "data.num_eval_batches=1",
            "logging.progress=false", "logging.tensorboard=false", "mesh.num_devices=1"]


# A finished 6-step run with an eval and a checkpoint every 2 steps, trained once per session and
# shared by the run-directory and analysis tests; tests that write into it work on a copy.
CHECKPOINTED_RUN = [*TINY_RUN, "train.log_every=1", "train.eval_every=2", "optim.warmup_steps=2",
                    "checkpoint.every=2", "checkpoint.keep=5", "checkpoint.async_save=false"]


@pytest.fixture(scope="session")
def checkpointed_run(tmp_path_factory) -> pathlib.Path:
    from layerjax.config import load_config
    from layerjax.train.loop import train

    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    train(load_config("default", [*CHECKPOINTED_RUN, f"train.run_dir={run_dir}", "train.steps=6"]))
    return run_dir
