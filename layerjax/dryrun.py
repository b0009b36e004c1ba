"""The dry-run report: what a config means, without compiling or training anything."""

from __future__ import annotations

import jax
import numpy as np

from layerjax import sharding
from layerjax.config import Config
from layerjax.data.pipeline import build_data
from layerjax.train.flops import flops_per_token, matmul_params, relax_matmul_params, unique_matmul_params
from layerjax.train.memory import estimate_memory, human_bytes, memory_limit, remat_ignored, shortfall
from layerjax.train.state import build_setup, resolve_vocab


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def dry_run_report(cfg: Config) -> str:
    source = cfg.data.source
    if source == "text" and not cfg.data.paths and cfg.model.vocab_size:
        # An imported model's config names no corpus until training; its vocabulary is fixed.
        source += ", no data.paths yet"
    else:
        data = build_data(cfg, jax.process_index(), jax.process_count())
        cfg = resolve_vocab(cfg, data.vocab_size)
    setup = build_setup(cfg)
    m = cfg.model
    state = setup.abstract_state
    if m.recursion.blocks:  # shared blocks exist once but run at several depths
        params_line = (f"parameters           {setup.num_params:,} unique ({unique_matmul_params(m):,} in matmuls); "
                       f"effective {matmul_params(m) + relax_matmul_params(m):,} in matmuls per token "
                       f"({m.recursion.blocks} shared block(s), {m.recursion.pattern})")
    else:
        params_line = f"parameters           {setup.num_params:,} ({matmul_params(m):,} in matmuls)"
    lines = [
        params_line,
        f"FLOPs per token      {flops_per_token(m, cfg.data.seq_len):,.0f} (6N + attention, training)",
        f"tokens per step      {cfg.data.batch_size * cfg.data.seq_len:,} "
        f"({cfg.data.batch_size} x {cfg.data.seq_len}, {cfg.train.microbatches} microbatch(es))",
        f"vocabulary           {m.vocab_size} ({source})",
        "",
        f"layer plan: {m.num_layers} layers in {len(setup.plan.segments)} scanned segment(s)"
        + ("" if m.scan_layers else " (run unrolled: model.scan_layers=false"
           + ("; on CPU every activation is kept, whatever model.remat)" if remat_ignored(m) else ")")),
        setup.plan.table(),
        "",
        f"mesh {dict(setup.mesh.shape)} with rules '{cfg.mesh.rules}': {setup.rules}",
        f"batch sharding       {setup.batch_sharding.spec}",
        f"per device           params {sharding.per_device_bytes(state.params, setup.state_shardings.params) / 2**20:.1f} MiB, "
        f"optimizer state {sharding.per_device_bytes(state.opt_state, setup.state_shardings.opt_state) / 2**20:.1f} MiB "
        f"(total unsharded {(_bytes(state.params) + _bytes(state.opt_state)) / 2**20:.1f} MiB)",
        _memory_line(cfg),
        "",
        sharding.describe(state.params, setup.rules, setup.mesh),
    ]
    return "\n".join(lines)


def _memory_line(cfg: Config) -> str:
    """The estimate training refuses by (train/memory.py): shown, not raised, so that a dry run can
    size a config for a bigger machine than this one."""
    estimate, limit = estimate_memory(cfg), memory_limit()
    problem = shortfall(cfg, estimate, limit, jax.local_devices()[0].platform)
    verdict = ("no memory limit known for this device" if limit is None else f"{problem} (training refuses it)"
               if problem else f"fits in the {human_bytes(limit[0])} of {limit[1]}")
    return f"memory estimate      {estimate.describe()}; {verdict}"
