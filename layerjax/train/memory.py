"""A memory estimate from the config alone, and the check that refuses a run that cannot fit.

An impossible config (say model.d_model=262144) does not fail when it is built: the run sits
silent for minutes, tracing and compiling, before an allocation gives up. This module counts
instead, from the config alone: parameters, gradients and AdamW's two moments by their dtypes, and
the activations the backward pass keeps, per device after the mesh split. The count is rough and
errs low (no XLA temporaries, no fragmentation), so what it refuses cannot fit.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from layerjax import sharding
from layerjax.config import Config, ConfigError, ModelConfig, d_ff, head_dim, kv_heads
from layerjax.layers.attention_kernels import causal_block_bounds, resolve_attention_impl
from layerjax.layers.canon import canon_widths
from layerjax.layers.mlp import GATED_ACTIVATIONS
from layerjax.model.transformer import layers_unrolled, resolve_remat
from layerjax.train.flops import adapter_matmul_params, unique_matmul_params

ADAM_MOMENTS = 2  # optax.adamw keeps mu and nu, each in its parameter's dtype


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device holds during a train step, by kind."""

    params: int
    grads: int
    optimizer: int
    activations: int
    devices_per_host: int  # mesh devices on this host: on CPU they all share the host's memory

    @property
    def per_device(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"{human_bytes(self.per_device)} per device (params {human_bytes(self.params)}, "
                f"grads {human_bytes(self.grads)}, optimizer {human_bytes(self.optimizer)}, "
                f"activations {human_bytes(self.activations)})")


def human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while abs(n) >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def param_counts(m: ModelConfig) -> tuple[int, int]:
    """(base parameters, adapter parameters), counted from the config: the unique matmul weights
    (shared blocks once), the embedding and an untied head, learned positions, and the small
    vectors (norm gains, canon taps). Biases and QK-norm gains are left out (a fraction of a percent)."""
    widths = canon_widths(m)
    per_layer_small = 2 * m.d_model + m.canon_kernel * sum(widths[p] for p in m.canon)  # norm gains, canon taps
    unique_layers = (m.recursion.blocks + (2 if m.recursion.pattern.startswith("middle") else 0)
                     if m.recursion.blocks else m.num_layers)
    base = (unique_matmul_params(m) + (0 if m.tie_embeddings else m.vocab_size * m.d_model)
            + (m.max_seq_len * m.d_model if m.positions == "learned" else 0)
            + unique_layers * per_layer_small + m.d_model)
    return base, adapter_matmul_params(m)


def _split(rules: dict, sizes: dict[str, int], logical: str) -> int:
    """Devices a logical axis is split over (1: replicated)."""
    return math.prod(sizes[axis] for axis in rules.get(logical, ()))


def estimate_memory(cfg: Config, device_count: int | None = None, platform: str | None = None) -> MemoryEstimate:
    """Bytes per device of one train step under cfg's mesh. device_count: the devices the mesh is
    laid over (default: mesh.num_devices, or all of them); platform: the backend it runs on
    (default: this process's), which decides what model.remat and model.scan_unroll=auto keep.
    model.vocab_size=0 (not yet taken from the data) counts no embedding; resolve it first for
    the full estimate."""
    m = cfg.model
    count = device_count or cfg.mesh.num_devices or jax.device_count()
    sizes = sharding.mesh_sizes(cfg.mesh, count)
    rules = sharding.rules_from_config(cfg.mesh)
    # The weights' two dims: the model width (embed) and heads / MLP width (tensor parallel).
    width_split = _split(rules, sizes, "embed") * min(_split(rules, sizes, "heads"), _split(rules, sizes, "mlp"))
    base, adapters = param_counts(m)
    param_bytes = np.dtype(m.param_dtype).itemsize
    if m.adapter.kind == "none":
        trainable_bytes = base * param_bytes
        params = trainable_bytes
    else:  # a frozen base: adapters train in float32, and only they get gradients and moments
        trainable_bytes = adapters * 4
        params = base * param_bytes + trainable_bytes
    accumulator = 1 if cfg.train.microbatches > 1 else 0  # the running sum of microbatch gradients
    return MemoryEstimate(
        params=params // width_split,
        grads=(1 + accumulator) * trainable_bytes // width_split,
        optimizer=ADAM_MOMENTS * trainable_bytes // width_split,
        activations=_activation_bytes(cfg, _split(rules, sizes, "batch"), _split(rules, sizes, "heads"), count,
                                      platform),
        devices_per_host=min(count, jax.local_device_count()),
    )


def kept_activations(m: ModelConfig, platform: str | None = None) -> str:
    """Which remat policy the compiled step follows in effect: model.remat as resolved, except
    for layers run unrolled (model.scan_layers=false) on CPU, which keep every activation whatever
    the policy. XLA:CPU drops the optimisation barriers that hold each recomputation back until
    the backward pass (none is left in the compiled step), so the recomputation merges with the
    forward: unrolled bench_cpu keeps 736 MiB of XLA temp under none, full and save_dots alike,
    against 364 MiB scanned with save_dots. Inside a scan the loop keeps the two apart."""
    return "none" if remat_ignored(m, platform) else resolve_remat(m)


def remat_ignored(m: ModelConfig, platform: str | None = None) -> bool:
    """Whether model.remat has no effect: layers unrolled on CPU (see `kept_activations`), by
    scan_layers=false or by a scan body that holds the whole stack (model.scan_unroll, which "auto"
    sets to 0 on CPU for up to 12 layers: bench_cpu's XLA temp 457 against 295 MiB scanned). platform: the backend's (default: this process's first
    device's)."""
    platform = platform or jax.devices()[0].platform
    return platform == "cpu" and layers_unrolled(m, platform)


def _activation_bytes(cfg: Config, batch_split: int, tensor_split: int, devices: int, platform: str | None) -> int:
    """What the backward pass keeps for one microbatch on one device: per layer, the tensors a
    pre-norm block saves (model.remat=none), only the matmul outputs (save_matmuls; save_dots
    adds attention's), or only the layer input plus one layer recomputed at a time (full); and
    the float32 logits."""
    m, d = cfg.model, cfg.model.d_model
    rows = -(-cfg.data.batch_size // (cfg.train.microbatches * batch_split))
    tokens, seq = rows * cfg.data.seq_len, cfg.data.seq_len
    itemsize = np.dtype(m.dtype).itemsize
    q, kv, ff = m.num_heads * head_dim(m), kv_heads(m) * head_dim(m), d_ff(m)
    gated = m.mlp in GATED_ACTIVATIONS
    # Bytes per token; the heads and MLP parts are split by tensor parallelism. A whole layer keeps
    # its input, two norm outputs and residual, q/k/v and the attention output, the MLP's hidden
    # tensors, and the [heads, seq] attention scores (float32) and probabilities.
    whole_layer = (4 * d + (2 * q + 2 * kv + (4 if gated else 2) * ff) / tensor_split) * itemsize
    # The chunked kernel keeps one [heads, chunk] block of scores per query at a time, not [heads,
    # seq]; causal_blocks keeps the keys up to each query's block end, on average
    # `causal_block_keys`; cuDNN's flash attention keeps only each query's softmax statistics
    # (float32 per head), as does the CPU kernel, which runs causal_blocks on several devices.
    impl = resolve_attention_impl(m) if m.attention_impl == "auto" else m.attention_impl
    if impl == "cpu_kernel" and devices > 1:
        impl = "causal_blocks"
    keys_per_query = {"chunked": min(seq, m.attention_chunk), "cudnn": 0, "cpu_kernel": 0,
                      "causal_blocks": causal_block_keys(seq, m.attention_block)}.get(impl, seq)
    score_bytes = 4 if impl in ("cudnn", "cpu_kernel") else keys_per_query * (4 + itemsize)
    whole_layer += m.num_heads / tensor_split * score_bytes
    # save_matmuls keeps only the outputs of the weight matmuls (q, k, v, o, the MLP's up/gate, down).
    matmul_outputs = (2 * d + (q + 2 * kv + (2 if gated else 1) * ff) / tensor_split) * itemsize
    # save_dots adds attention's float32 scores and its weighted values (compute dtype), where they
    # are matmuls of the layer (the chunked kernel recomputes its own; cuDNN's are inside its
    # kernel); the CPU kernel keeps its output and one float32 statistic per head instead.
    attention_dots = 0 if impl in ("chunked", "cudnn") else \
        (m.num_heads * max(keys_per_query, 1) * 4 + q * itemsize) / tensor_split
    saved = {"none": m.num_layers * whole_layer,
             "save_matmuls": m.num_layers * matmul_outputs + whole_layer,
             "save_dots": m.num_layers * (matmul_outputs + attention_dots) + whole_layer,
             "full": m.num_layers * d * itemsize + whole_layer}[kept_activations(m, platform)]
    # float32 logits and their gradient: of every position, or of one block of model.loss_chunk
    # positions (the backward pass recomputes each block from the residual stream).
    logit_positions = min(seq, m.loss_chunk) if m.loss_chunk else seq
    logits = rows * logit_positions * 2 * m.vocab_size * 4
    return int(tokens * saved + logits)


def memory_limit() -> tuple[int, str] | None:
    """(bytes, what they are) that one host's mesh devices may hold together on CPU, or that one
    accelerator may hold; None where the backend does not say."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"


def shortfall(cfg: Config, estimate: MemoryEstimate, limit: tuple[int, str] | None,
              platform: str) -> str | None:
    """None if the estimate fits the limit, else "..., more than the <limit> of <what>: <what to
    change>", one line to follow the estimate."""
    if limit is None:
        return None
    limit_bytes, what = limit
    # CPU devices are slices of one host: together they must fit in its memory.
    shared = platform == "cpu" and estimate.devices_per_host > 1
    need = estimate.per_device * (estimate.devices_per_host if shared else 1)
    if need <= limit_bytes:
        return None
    m = cfg.model
    if estimate.activations > estimate.params + estimate.grads + estimate.optimizer:
        fixes = "lower data.batch_size or data.seq_len, raise train.microbatches"
        if remat_ignored(m, platform):
            scan = "model.scan_layers=true" if not m.scan_layers else "model.scan_unroll=1"
            fixes += f", or set {scan} (unrolled layers on CPU keep every activation whatever model.remat)"
        elif resolve_remat(m) != "full":
            fixes += ", or set model.remat=full"
    else:
        fixes = "use a smaller model (model.d_model, model.num_layers, model.d_ff)"
        fixes += ", model.param_dtype=bfloat16" if m.param_dtype == "float32" else ""
        fixes += (", or shard it over more devices with mesh.rules=fsdp" if cfg.mesh.rules in ("dp", "tp")
                  else ", or spread it over more devices")
    need_text = f"{human_bytes(need)} on this host ({estimate.devices_per_host} devices)," if shared else "that is"
    return f"{need_text} more than the {human_bytes(limit_bytes)} of {what}: {fixes}"


def check_fits(cfg: Config) -> MemoryEstimate:
    """Raises ConfigError when cfg's train step cannot fit in memory, in milliseconds and before
    anything is built or allocated; returns the estimate. Call it with model.vocab_size resolved."""
    estimate = estimate_memory(cfg)
    problem = shortfall(cfg, estimate, memory_limit(), jax.local_devices()[0].platform)
    if problem:
        m = cfg.model
        raise ConfigError(f"model.d_model={m.d_model} x model.num_layers={m.num_layers} needs about "
                          f"{estimate.describe()}; {problem}")
    return estimate


def causal_block_keys(seq: int, block: int) -> float:
    """Keys per query, averaged over a row, that attention_impl=causal_blocks computes scores for."""
    return sum((end - start) * end for start, end in causal_block_bounds(seq, block)) / seq
