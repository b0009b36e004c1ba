"""The typed config tree: frozen dataclasses, TOML presets, dotted overrides, validation.

One tree (`Config`) with one section per concern. Presets are TOML files in `configs/` that may
`extends = "other_preset"`; command-line overrides are `section.field=value`. Every check that
can fail runs in `validate` before anything is compiled, and each error names the setting, what
was expected, and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import pathlib
import tomllib
import typing
from dataclasses import dataclass, field

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, mistyped, out of range or inconsistent."""


# Allowed values of enumerated settings, in one place so errors and docs list the same set.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.positions": ("rope", "learned", "none"),
    "model.mlp": ("swiglu", "geglu", "gelu"),
    "model.norm_type": ("rms", "layer"),
    # Norm schemes (README "Normalization schemes"): placements and per-layer scalings.
    "model.norm": ("pre", "post", "mix", "peri", "reordered", "lns", "deepnorm", "none"),
    "model.remat": ("auto", "none", "full", "save_matmuls", "save_dots"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.qk_norm_scope": ("head", "full"),
    # Attention kernels (README "Attention implementations"; layerjax/layers/attention_kernels.py).
    "model.attention_impl": ("auto", "xla", "causal_blocks", "jax_nn", "cudnn", "chunked", "cpu_kernel"),
    "model.canon_impl": ("auto", "xla", "cpu_kernel"),
    # Dense-layer matmuls (README "Performance on CPU"; layerjax/layers/matmul_cpu.py).
    "model.matmul_impl": ("auto", "xla", "mkl"),
    # Tuple settings: every entry must be one of these.
    "model.window_pattern": ("local", "global"),
    "model.bias_projections": ("q", "k", "v", "o", "up", "down"),
    "model.adapter.kind": ("none", "lora", "mola", "mole"),
    "model.adapter.targets": ("q", "k", "v", "o", "gate", "up", "down"),
    "model.recursion.pattern": ("cycle", "sequence", "middle_cycle", "middle_sequence"),
    "model.recursion.lora_targets": ("q", "k", "v", "o", "gate", "up", "down"),
    "data.source": ("depo", "brevo", "mano", "recall", "synthetic_random", "text", "sft"),
    "data.sft.template": ("simple", "jinja"),
    "data.sft.overlong": ("drop", "truncate", "error"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "optim.update_impl": ("auto", "optax", "cpu_kernel"),
    "mesh.rules": ("dp", "fsdp", "fsdp_tp", "tp", "custom"),
    "train.on_nonfinite": ("stop", "skip"),
}


ADAPTER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class AdapterConfig:
    """Low-rank adapters for fine-tuning a frozen base: LoRA, MoLA (LoRA experts on every targeted
    projection, their number varying with depth) or MoLE (experts on the MLP, one router per layer)."""

    # "lora": one low-rank delta per targeted projection; "mola": LoRA experts on each targeted
    # projection, each with its own token router; "mole": experts on the MLP, one router per layer.
    kind: str = "none"
    targets: tuple[str, ...] = ADAPTER_TARGETS  # projections that get an adapter (mole: the MLP ones)
    rank: int = 8  # rank of each low-rank delta B A (of each expert under mola / mole)
    alpha: float = 16.0  # the delta is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    rslora: bool = False  # rank-stabilised LoRA: scale by alpha / sqrt(rank) instead of alpha / rank
    dropout: float = 0.05  # dropout rate on the adapter's input (the router reads it before dropout)
    # mola/mole: LoRA experts per layer, one entry per layer, or a pattern over equal blocks of
    # depth: "2,4,6,8" gives each quarter of the layers 2, 4, 6 and 8 experts (MoLA's triangle).
    experts: tuple[str, ...] = ("2", "4", "6", "8")
    top_k: int = 2  # experts per token (mole: 1)
    # top_k=1 weights the chosen expert by its softmax probability (Switch), so the LM loss trains
    # the router; true renormalises it to exactly 1 as MoLA's code does (the router gets no gradient).
    renormalize_top1: bool = False
    balance_loss: float = 0.0  # coefficient of the per-layer load-balancing loss (MoLA's code: 0.001)
    router_z_loss: float = 0.0  # coefficient of the routers' mean squared log-partition


@dataclass(frozen=True)
class RecursionConfig:
    """Recursive shared blocks (Relaxed Recursive Transformers, Bae et al. 2025): num_layers depths
    run by `blocks` unique blocks, each applied several times, optionally relaxed per depth by LoRA."""

    blocks: int = 0  # unique shared blocks K; 0: no sharing (every depth its own layer)
    # Which block depth l runs, R = depths / K: "cycle" l mod K (the stack of K looped R times);
    # "sequence" floor(l / R) (each block R times in a row); "middle_*" the same over depths
    # 1..L-2, with the first and the last layer unshared.
    pattern: str = "cycle"
    # Rank of the per-depth relaxation W_shared x + B_l A_l x (scale 1) of the attention
    # projections (q, k, v, o) named in lora_targets; 0: none.
    lora_rank: int = 0
    lora_rank_mlp: int = -1  # the same for the MLP projections (gate, up, down); -1: lora_rank
    lora_targets: tuple[str, ...] = ADAPTER_TARGETS  # projections relaxed per depth (ranks: lora_rank*)
    # Early exit: extra losses on the shared head (through the final norm) after these depths
    # (counted in layers run, 1..num_layers-1), or "loops" for after every loop but the last.
    exits: tuple[str, ...] = ()
    # Loss weight of each exit, or one for all (default 1); the last layer's loss weighs 1.
    exit_weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # token vocabulary; 0: taken from the data source's tokenizer
    num_layers: int = 4  # layers, i.e. depths (with model.recursion, fewer shared blocks run them)
    d_model: int = 256  # width of the residual stream and the embeddings
    num_heads: int = 4  # query heads per attention layer
    num_kv_heads: int = 0  # key/value heads; 0: same as num_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0  # width of each head; 0: d_model // num_heads
    d_ff: int = 0  # MLP hidden width; 0: 4*d_model for gelu, 8/3*d_model rounded up to 64s for swiglu/geglu
    # Longest sequence the model takes: rows of learned positions, the limit of sampling, and the
    # context length an export declares; data.seq_len may not exceed it.
    max_seq_len: int = 256
    positions: str = "rope"  # rope: q and k rotated by position; learned: a position embedding added; none
    rope_theta: float = 10000.0  # RoPE base: pair i of a head rotates at rope_theta^(-2i / rotated dims)
    # RoPE frequency scaling as Hugging Face computes it: "linear" divides every frequency by
    # rope_factor; "llama3" divides only the low ones, blending between the two wavelength bounds
    # rope_original_max_len / rope_low_freq_factor and rope_original_max_len / rope_high_freq_factor.
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # linear and llama3: the context extension factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above rope_original_max_len / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below rope_original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3 only: the context length the model was trained at
    rope_fraction: float = 1.0  # partial RoPE (GPT-NeoX): rotate the first int(head_dim * this) dims
    mlp: str = "swiglu"  # swiglu and geglu are gated (silu / tanh-GELU on the gate); gelu is not
    norm_type: str = "rms"  # every norm is an RMSNorm ("rms") or a LayerNorm ("layer")
    norm: str = "pre"  # norm scheme of every layer, unless layer_norms overrides it
    mix_alpha: float = 0.25  # norm=mix: the first floor(mix_alpha * num_layers) layers are Post-LN
    deepnorm_alpha: float = 0.0  # norm=deepnorm: the residual multiplier; 0: (2 * num_layers)^(1/4)
    # Per-layer scheme overrides, "first-last:scheme" with 0-based inclusive layer indices,
    # e.g. ("0-2:post",); any scheme but mix. Neighbouring equal layers share one scanned segment.
    layer_norms: tuple[str, ...] = ()
    embed_norm: bool = False  # a norm on the embedding output (optional in Peri-LN)
    norm_eps: float = 1e-6  # added to the variance (mean square for rms) inside every norm
    norm_offset: bool = False  # every norm computes x_hat * (1 + w), w initialised to 0 (Gemma)
    qk_norm: bool = False  # normalise queries and keys before their dot product (see qk_norm_scope)
    # "head": each head's q and k normalised over head_dim (Qwen3); "full": all of a token's q
    # (heads * head_dim values) and all of its k with one norm each (OLMo-2).
    qk_norm_scope: str = "head"
    attn_scale: float = 0.0  # multiplier of q.k; 0: head_dim^-0.5 (Gemma-2: query_pre_attn_scalar^-0.5)
    attn_softcap: float = 0.0  # 0: off; else attention logits become cap * tanh(logits / cap)
    final_softcap: float = 0.0  # 0: off; else output logits become cap * tanh(logits / cap)
    # How attention is computed (the same result): "xla" the hand-written whole-score-matrix
    # formulation (the reference); "causal_blocks" the same per block of queries, skipping the keys
    # after each block (the upper triangle); "jax_nn" jax.nn.dot_product_attention's XLA
    # implementation; "cudnn" its cuDNN flash attention (NVIDIA GPU and dtype bfloat16); "chunked"
    # blockwise with an online softmax, memory linear in the sequence length; "cpu_kernel" C++
    # kernels through XLA's FFI, compiled on first use (float32, head dim a multiple of 16; on a
    # computation of several devices, or without a C++ compiler, it runs causal_blocks); "auto"
    # cudnn where it runs, cpu_kernel on CPU where it applies, else causal_blocks. jax_nn and
    # cudnn have no attn_softcap. One-token decoding steps run xla.
    attention_impl: str = "auto"
    # The dense layers' weight matmuls (attention projections, MLP, head): "xla" XLA's dot; "mkl"
    # MKL's sgemm through XLA's FFI, on CPU in float32 (needs the layerjax[mkl] extra; on a
    # computation of several devices it runs xla); "auto" mkl where it runs, else xla.
    matmul_impl: str = "auto"
    attention_chunk: int = 512  # attention_impl=chunked: queries (and keys) per block of scores
    # attention_impl=causal_blocks: queries per block (more when a row would have over 4 blocks)
    attention_block: int = 128
    # Sequence positions per block of the output head in the loss (train and eval steps): one
    # float32 [batch, loss_chunk, vocab] block of logits at a time, recomputed in the backward pass,
    # instead of [batch, seq_len, vocab] (for large vocabularies); 0: the whole sequence at once.
    loss_chunk: int = 0
    # Keys a query sees in a sliding-window layer: itself and the W-1 before it (0: no window).
    sliding_window: int = 0
    # Which layers slide, as a cycle of "local" / "global" (layer l takes entry l % len), e.g.
    # ("local", "global") for Gemma-2; empty: every layer is local when sliding_window > 0.
    window_pattern: tuple[str, ...] = ()
    # Canon layers (Physics of LMs 4.1): any of "A" (before attention, after its norm), "B" (on
    # q, k, v before RoPE), "C" (before the MLP, after its norm), "D" (on the MLP's hidden
    # pre-activation), e.g. "ABCD". Causal depthwise conv of canon_kernel taps.
    canon: str = ""  # "" or "none": no canon layers
    canon_kernel: int = 4  # taps of each canon convolution: a token and the kernel-1 before it
    canon_residual: bool = True  # a canon layer outputs h + conv(h); false: conv(h) alone
    canon_bias: bool = False  # a bias on the convolution
    canon_activation: bool = False  # SiLU on the convolution
    canon_trainable: bool = True  # false: canon weights stay at their random init (frozen)
    # How a canon convolution is computed (the same result): "xla" shifted adds in JAX; "cpu_kernel"
    # one-pass C++ kernels through XLA's FFI, compiled on first use (needs a C++ compiler; float32,
    # CPU, one device); "auto" cpu_kernel where it applies and builds, else xla.
    canon_impl: str = "auto"
    final_norm: bool = True  # a norm on the last layer's output, before the head
    use_bias: bool = False  # a bias on every projection and every norm (GPT-2)
    # Projections with a bias when use_bias is false: any of "q", "k", "v", "o" (attention), "up"
    # (the MLP's input side: gate and up, or w_in) and "down" (its output), e.g. Qwen2's q, k, v.
    bias_projections: tuple[str, ...] = ()
    embed_scale: bool = False  # multiply the token embeddings by sqrt(d_model) (Gemma; not the tied head)
    tie_embeddings: bool = True  # the output head is the token embedding table; false: a separate matrix
    init_std: float = 0.02  # std of the normal init of embeddings, attention and MLP weights (DeepNorm scales some)
    # Packed rows hold several documents; with this on, attention never crosses a document.
    document_mask: bool = True
    # One scan per segment of equal layers: compile time flat in depth. false: a python loop over
    # the layers; on CPU 3-7% faster for short stacks, but there it keeps every activation whatever
    # remat is (about twice the memory), and compile time grows with depth (README "Performance on CPU").
    scan_layers: bool = True
    # Layers per iteration of each segment's scan; 0: the whole segment in one (no loop left, so
    # no stacked copies of saved activations); "auto": 0 on CPU for models of at most 12 layers,
    # else 1. Without the loop XLA:CPU neither zero-fills, copies in nor copies out the stacked
    # activations: bench_cpu's step 0.90x and the 12-layer width-768 one 0.91x as long, at 1.5x
    # the XLA temp memory (remat has no effect there) and a compile time that grows with depth,
    # hence the 12-layer bound (README "Performance on CPU"). Same results either way.
    scan_unroll: int | str = "auto"
    # Rematerialisation of each layer in the backward pass: "none" keeps its activations; "full"
    # recomputes the layer; "save_matmuls" keeps the weight matmuls' outputs, recomputes the rest;
    # "save_dots" keeps attention's score and value matmuls too; "auto" is save_dots on CPU (faster
    # there than keeping everything, README "Performance on CPU") and none on accelerators. No
    # effect on CPU where the layers run unrolled (scan_layers=false, or scan_unroll covering the
    # stack, as auto does up to 12 layers): XLA:CPU merges the recomputation back into the forward,
    # so "auto" is none there.
    remat: str = "auto"
    dtype: str = "float32"  # compute dtype; norm statistics, softmax and RoPE angles stay float32
    param_dtype: str = "float32"  # dtype parameters (and so the optimizer state) are stored in
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    recursion: RecursionConfig = field(default_factory=RecursionConfig)


@dataclass(frozen=True)
class DepoConfig:
    """Depo (Physics of LMs 4.1): k-th successor queries over random directed cycles."""

    min_nodes: int = 4  # fewest nodes of a cycle (each cycle's size is uniform in min_nodes..max_nodes)
    max_nodes: int = 8  # most nodes of a cycle
    num_cycles: int = 1  # cycles per sample
    max_hops: int = 4  # k is drawn from 1..max_hops
    queries: int = 1  # queries per sample
    name_vocab: int = 32  # distinct tokens names are spelled with
    min_name_len: int = 1  # fewest tokens in a node's name
    max_name_len: int = 2  # most tokens in a node's name


@dataclass(frozen=True)
class BrevoConfig:
    """Brevo (Physics of LMs 4.1): list all ancestors of a query node of a random DAG."""

    min_nodes: int = 5  # fewest nodes of a DAG (each DAG's size is uniform in min_nodes..max_nodes)
    max_nodes: int = 8  # most nodes of a DAG; 8: the longest sample (125 tokens) fits data.seq_len=128
    max_degree: int = 4  # bound on each node's in-degree and out-degree
    name_vocab: int = 32  # single-token node names, distinct within a sample


@dataclass(frozen=True)
class ManoConfig:
    """Mano (Physics of LMs 4.1): prefix-notation +, -, x expressions mod `modulus`."""

    min_ops: int = 1  # operators per expression (L), drawn uniformly from min_ops..max_ops
    max_ops: int = 4  # most operators per expression
    modulus: int = 23  # the arithmetic is mod this; numbers are 0..modulus-1, one token each


@dataclass(frozen=True)
class RecallConfig:
    """Associative recall: key-value pairs, then queries for some keys' values."""

    pairs: int = 16  # key-value pairs listed per sample
    queries: int = 4  # queries per sample, each for the value of a listed key
    num_keys: int = 64  # distinct key tokens (keys in a sample are distinct)
    num_values: int = 64  # distinct value tokens (values may repeat within a sample)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning records (data.source=sft; README "Supervised fine-tuning data")."""

    prompt_field: str = "prompt"  # JSONL field of a prompt/response record's prompt
    response_field: str = "response"  # JSONL field of a prompt/response record's response (the trained part)
    messages_field: str = "messages"  # JSONL field of a chat record: a list of {role, content}
    task_field: str = "task"  # optional per-record task name: one exact-match bucket per task; "" ignores it
    template: str = "simple"  # "simple": <|user|>/<|assistant|> markers; "jinja": data.sft.chat_template
    chat_template: str = ""  # template=jinja: a Hugging Face style Jinja chat template over `messages`
    overlong: str = "drop"  # a sample longer than data.seq_len: "drop", "truncate" (its end) or "error"


@dataclass(frozen=True)
class DataConfig:
    # Generated tasks (depo, brevo, mano, recall: settings in their sections; synthetic_random:
    # uniform tokens), text files or SFT records (both read from data.paths).
    source: str = "depo"
    seq_len: int = 128  # tokens per row; documents are packed into rows of this length
    batch_size: int = 32  # global batch, in sequences
    seed: int = 0  # seeds generated samples and the shuffle order of text and SFT data
    paths: tuple[str, ...] = ()  # source=text: .txt, .jsonl or .parquet files; source=sft: .jsonl files
    text_field: str = "text"  # the field holding each document's text in .jsonl / .parquet files
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    val_fraction: float = 0.05  # source=text/sft: the last fraction of documents (records) is held out for eval
    synthetic_vocab: int = 4096  # source=synthetic_random: tokens are uniform in [0, synthetic_vocab)
    num_eval_batches: int = 8  # held-out batches per eval, the same ones every time
    depo: DepoConfig = field(default_factory=DepoConfig)
    brevo: BrevoConfig = field(default_factory=BrevoConfig)
    mano: ManoConfig = field(default_factory=ManoConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3  # peak learning rate of AdamW, reached after warmup
    # After warmup: cosine or linear decay to min_lr_ratio * lr, constant, or wsd (stay at lr,
    # then decay linearly over the last decay_fraction of the steps).
    schedule: str = "cosine"
    warmup_steps: int = 50  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays
    b1: float = 0.9  # Adam's decay rate of the first moment (mean) of the gradients
    b2: float = 0.95  # Adam's decay rate of the second moment (mean square) of the gradients
    eps: float = 1e-8  # added to the root of the second moment in Adam's denominator
    weight_decay: float = 0.1  # AdamW's decoupled decay; each step shrinks weights by lr * weight_decay
    # Parameter kinds spared from weight decay: any of "norm", "bias", "embed".
    no_decay: tuple[str, ...] = ("norm", "bias")
    clip_norm: float = 1.0  # gradients are scaled down to at most this global norm; 0: no clipping
    # How the update is computed (the same AdamW): "optax" its chain, jitted; "cpu_kernel" a two-pass
    # C++ kernel through XLA's FFI, compiled on first use (needs a C++ compiler; float32 parameters,
    # CPU, one device); "auto" cpu_kernel where it applies and builds, else optax.
    update_impl: str = "auto"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600  # optimizer steps of the whole run (a resumed run continues up to this)
    microbatches: int = 1  # gradient accumulation inside the step
    seed: int = 0  # seeds the parameter init and dropout (data.seed seeds the data)
    z_loss: float = 0.0  # coefficient of the mean squared log-partition (log Z) of the output logits
    # A non-finite loss or gradient: "stop" ends the run naming the last good checkpoint;
    # "skip" drops that update and goes on.
    on_nonfinite: str = "stop"
    # on_nonfinite="skip": stop the run after more than this many dropped updates in a row (0: never).
    max_skipped_in_row: int = 20
    # on_nonfinite="skip": stop the run when more than this fraction of its steps dropped their
    # update (checked from 20 steps on; 1: never). summary.json counts them (skipped_updates).
    max_skipped_fraction: float = 0.2
    log_every: int = 20  # write train metrics (loss, tokens/s, MFU) every N steps
    eval_every: int = 200  # evaluate on the held-out batches at step 0, every N steps and at the end; 0: never
    # Where checkpoints, config.toml, metrics.jsonl, TensorBoard logs and plots go; running the same
    # command again resumes from its latest checkpoint.
    run_dir: str = "runs/default"
    # "a-b": record a jax.profiler trace of steps a..b (1-based, inclusive) into <run_dir>/profile,
    # for TensorBoard's profile tab or Perfetto ("": off). Start at 2 or later: step 1 compiles.
    profile_steps: str = ""
    # A run directory (e.g. one written by tools/import_hf.py) whose latest checkpoint's parameters
    # start this run when train.run_dir has no checkpoint yet; the optimizer state starts fresh.
    init_from: str = ""


@dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis. 0: unset (1, or all remaining devices for the axis the rules preset
    splits the batch over); -1: all remaining devices (at most one axis)."""

    data: int = 0  # data parallel: the batch is split over it, parameters replicated
    fsdp: int = 0  # the batch is split over it, and (rules fsdp, fsdp_tp) weights along their model width
    expert: int = 0  # the batch is split over it, and (rules fsdp, fsdp_tp, tp) LoRA experts
    tensor: int = 0  # (rules fsdp_tp, tp) attention heads and MLP width are split over it


@dataclass(frozen=True)
class MeshConfig:
    # Which logical axes are split over which mesh axes: a preset of layerjax/sharding.py, or
    # custom (the table in mesh.custom_rules).
    rules: str = "dp"
    shape: MeshShape = field(default_factory=MeshShape)
    # rules=custom: "logical=axis[+axis]" entries, e.g. ["batch=data+fsdp", "embed=fsdp", "mlp=tensor"].
    custom_rules: tuple[str, ...] = ()
    num_devices: int = 0  # 0: all global devices; fewer: the first N (single process only)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # save every N steps; 0 disables periodic checkpoints (the final one is still written)
    keep: int = 2  # how many of the latest checkpoints stay on disk
    async_save: bool = True  # write checkpoints in the background while training goes on


@dataclass(frozen=True)
class LoggingConfig:
    # A progress bar with loss, tokens/s and MFU (process 0 only) when stdout is a terminal; under
    # SLURM, nohup or CI (or with false) one plain line per log step instead.
    progress: bool = True
    tensorboard: bool = True  # also write metrics as TensorBoard events to <run_dir>/tensorboard
    # Per-layer gradient norms and residual-stream statistics every N steps, from one extra
    # forward/backward pass on the step's batch (0: off; cheap for small models).
    layer_stats_every: int = 0
    # At each eval: the angular-distance heatmap between all layers' hidden states and each
    # layer's removal sensitivity (one extra eval pass per layer).
    layer_eval: bool = False
    # FLOP/s per device that MFU divides by; 0: measured at start by a matmul probe in model.dtype
    # (a bf16 probe for bf16 runs). Give the datasheet figure to compare across machines.
    peak_flops: float = 0.0
    # Weights & Biases project to log to as well ("": off); needs `pip install -e '.[wandb]'`.
    # Set WANDB_MODE=offline to log without a network (`wandb sync` uploads later).
    wandb_project: str = ""
    wandb_entity: str = ""  # W&B team or user ("": your default entity)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the architecture, layer by layer
    data: DataConfig = field(default_factory=DataConfig)  # what is trained on, and how it is batched
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW, clipping and the learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop: steps, seeds, logging, run directory
    mesh: MeshConfig = field(default_factory=MeshConfig)  # how devices are arranged and what is sharded over them
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # Orbax checkpoints in train.run_dir
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # progress bar, TensorBoard, per-layer diagnostics



# ---------------------------------------------------------------- tree <-> dict, overrides


def to_dict(cfg) -> dict:
    return {
        f.name: to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
        for f in dataclasses.fields(cfg)
        for v in [getattr(cfg, f.name)]
    }


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, typ, key: str):
    """Converts a TOML or command-line value to the field's declared type, or raises."""
    origin = typing.get_origin(typ)
    if origin in (tuple,):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if typing.get_args(typ) == (int, str):  # a count or a word ("auto"): a number is the count
        try:
            return _coerce(value, int, key)
        except ConfigError:
            if isinstance(value, str):
                return value
            raise ConfigError(f"{key}: expected an integer or a word, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _unknown_key(key: str, valid: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, typ in _field_types(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _apply(cfg, updates: dict, prefix: str = ""):
    """Returns cfg with a nested dict of updates applied (types coerced, keys checked)."""
    types_ = _field_types(type(cfg))
    changes = {}
    for name, value in updates.items():
        key = prefix + name
        if name not in types_:
            raise _unknown_key(key, all_keys())
        typ = types_[name]
        if dataclasses.is_dataclass(typ):
            if isinstance(value, str):  # compact form: section=field:value,field:value
                value = _parse_compact(value, key)
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: is a section; set its fields, e.g. {key}.<field>=...")
            changes[name] = _apply(getattr(cfg, name), value, key + ".")
        else:
            changes[name] = _coerce(value, typ, key)
    return dataclasses.replace(cfg, **changes)


def _parse_compact(text: str, key: str) -> dict:
    """"data:-1,fsdp:4" -> {"data": "-1", "fsdp": "4"} for section=... overrides."""
    entries = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, value = entry.partition(":")
        if not sep:
            raise ConfigError(f"{key}={text!r}: expected field:value entries, e.g. {key}=data:-1,fsdp:4")
        entries[name.strip()] = value.strip()
    return entries


def parse_overrides(args: typing.Sequence[str]) -> dict:
    """["model.num_layers=12", "optim.lr=3e-4"] -> nested dict of strings."""
    nested: dict = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override '{arg}' is not of the form section.field=value")
        key, value = arg.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name: str) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name}.toml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"config preset '{name}' not found: give a .toml path or one of {known}")


def load_preset(name: str, _seen: tuple = ()) -> dict:
    path = preset_path(name)
    if path in _seen:
        raise ConfigError(f"preset {path} extends itself (cycle {[str(p) for p in _seen]})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    _resolve_input_paths(raw, path.parent)
    if "extends" not in raw:
        return raw
    parent = raw.pop("extends")
    # TOML happily parses `extends = 3` or `extends = ["a", "b"]`; only one preset name means anything.
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: extends={parent!r} must name one preset or .toml path as a string, "
                          'e.g. extends = "default"')
    return _merge(load_preset(parent, _seen + (path,)), raw)


REPO_DIR = CONFIG_DIR.parent


def _input_path(name: str, base: pathlib.Path) -> str:
    """A data file named in a preset: relative names are read from the preset's folder, or from
    the repository for the presets in configs/ (whose examples name repo-relative files), never
    from wherever the command happens to run; absolute and ~ paths are kept."""
    path = pathlib.Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    candidates = [base / path, REPO_DIR / path]
    found = next((c for c in candidates if c.exists()), None)
    default = REPO_DIR / path if base.resolve() == CONFIG_DIR else base / path
    return str((found or default).resolve())


def _resolve_input_paths(raw: dict, base: pathlib.Path) -> None:
    """Resolves data.paths and a data.tokenizer file of a preset's raw TOML in place."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    if isinstance(data.get("paths"), list):
        data["paths"] = [_input_path(p, base) if isinstance(p, str) else p for p in data["paths"]]
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, str) and tokenizer not in ("", "byte"):
        data["tokenizer"] = _input_path(tokenizer, base)


def _absolute_inputs(cfg: Config) -> Config:
    """Command-line data paths are relative to the current directory: made absolute, so the run's
    saved config.toml reads the same files from anywhere."""
    d = cfg.data
    absolute = lambda name: str(pathlib.Path(name).expanduser().resolve())
    tokenizer = d.tokenizer if d.tokenizer in ("", "byte") else absolute(d.tokenizer)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, paths=tuple(absolute(p) for p in d.paths),
                                                            tokenizer=tokenizer))


def config_from_dict(values: dict) -> Config:
    """Builds and validates a config from a nested dict of section -> field -> value (as TOML has
    it), e.g. the config a Hugging Face import derives."""
    cfg = _apply(Config(), values)
    validate(cfg)
    return cfg


def load_config(preset: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Builds the config: defaults <- preset chain <- overrides, then validates it."""
    cfg = Config()
    if preset:
        cfg = _apply(cfg, load_preset(preset))
    cfg = _absolute_inputs(_apply(cfg, parse_overrides(overrides)))
    if cfg.model.canon.lower() == "none":  # spelled out, e.g. in ablation grids: model.canon=none,ABCD
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, canon=""))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- TOML output


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # JSON string escapes are valid TOML basic-string escapes (newlines in templates)
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(cfg) -> str:
    """The resolved config as TOML, loadable again as a preset."""
    lines: list[str] = []

    def emit(d: dict, prefix: str):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in d.items():
            if isinstance(v, dict):
                emit(v, f"{prefix}.{k}")

    for section, values in to_dict(cfg).items():
        emit(values, section)
    return "\n".join(lines)


# ---------------------------------------------------------------- derived values and checks


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _require(values: dict[str, float], inside: typing.Callable[[float], bool], expected: str,
             why: str = "") -> None:
    """One range check for several settings: raises naming the first value that is not `inside`.
    Without a `why`, the message suggests the default as a value known to work."""
    for key, value in values.items():
        if not inside(value):
            hint = f" ({why})" if why else f"; e.g. the default {key}={_get(Config(), key)}"
            raise ConfigError(f"{key}={value} must be {expected}{hint}")


def _require_finite(cfg: Config) -> None:
    """NaN compares false with everything, so it would slip past every range check below; and no
    setting means anything at infinity. So every float setting must be finite, checked first."""
    for key in all_keys():
        value = _get(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; e.g. the default {key}={_get(Config(), key)}")


def validate(cfg: Config) -> None:
    """Raises ConfigError for the first problem found, before anything expensive happens."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if isinstance(value, tuple):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ConfigError(f"{key} has {bad}; every entry must be one of {list(allowed)}")
        elif value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    _require_finite(cfg)
    m, o, t = cfg.model, cfg.optim, cfg.train
    _require({
        "model.num_layers": m.num_layers, "model.d_model": m.d_model, "model.num_heads": m.num_heads,
        "model.max_seq_len": m.max_seq_len, "model.rope_theta": m.rope_theta, "data.seq_len": cfg.data.seq_len,
        "data.batch_size": cfg.data.batch_size, "train.steps": t.steps,
        "train.microbatches": t.microbatches, "train.log_every": t.log_every,
        "checkpoint.keep": cfg.checkpoint.keep, "model.attention_chunk": m.attention_chunk,
        "model.attention_block": m.attention_block,
    }, lambda v: v > 0, "positive")
    if m.scan_unroll != "auto" and (not isinstance(m.scan_unroll, int) or m.scan_unroll < 0):
        raise ConfigError(f"model.scan_unroll={m.scan_unroll} must be >= 0: layers per scan iteration, "
                          "0 for each segment's whole stack in one; or auto")
    # Cadences: 0 is how one is turned off; a negative one is a typo, not a cadence (the loop's
    # `step % n` would quietly fire every |n| steps).
    _require({"train.eval_every": t.eval_every, "checkpoint.every": cfg.checkpoint.every,
              "logging.layer_stats_every": cfg.logging.layer_stats_every,
              "train.max_skipped_in_row": t.max_skipped_in_row, "model.loss_chunk": m.loss_chunk},
             lambda v: v >= 0, ">= 0", "0 turns it off")
    _require({"optim.lr": o.lr, "optim.warmup_steps": o.warmup_steps, "optim.clip_norm": o.clip_norm,
              "optim.weight_decay": o.weight_decay, "optim.eps": o.eps, "train.z_loss": t.z_loss,
              "model.init_std": m.init_std, "model.norm_eps": m.norm_eps,
              "model.adapter.balance_loss": m.adapter.balance_loss,
              "model.adapter.router_z_loss": m.adapter.router_z_loss,
              "data.num_eval_batches": cfg.data.num_eval_batches}, lambda v: v >= 0, ">= 0")
    # Adam's moment decays: with b = 1 a moment never moves from 0 and its bias correction divides by 1 - b^t = 0.
    _require({"optim.b1": o.b1, "optim.b2": o.b2}, lambda v: 0 <= v < 1, "in [0, 1)")
    _require({"optim.min_lr_ratio": o.min_lr_ratio, "optim.decay_fraction": o.decay_fraction,
              "train.max_skipped_fraction": t.max_skipped_fraction}, lambda v: 0 <= v <= 1, "in [0, 1]")
    if t.eval_every and cfg.data.num_eval_batches == 0:
        raise ConfigError(f"train.eval_every={t.eval_every} evaluates on data.num_eval_batches=0 batches; "
                          "set data.num_eval_batches >= 1, or train.eval_every=0 to turn eval off")
    if not t.run_dir.strip():  # an empty path is the current directory: checkpoints would land among the sources
        raise ConfigError("train.run_dir is empty, which would write the run into the current directory; "
                          "name a directory, e.g. train.run_dir=runs/my_run")
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model}; "
            "choose a divisor or set model.head_dim explicitly")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"model.num_kv_heads={kv} must divide model.num_heads={m.num_heads} (grouped-query attention)")
    if set(m.canon) - set("ABCD") or len(set(m.canon)) != len(m.canon):
        raise ConfigError(f"model.canon={m.canon!r} must be distinct letters from 'ABCD', e.g. 'ABCD' or 'AC'")
    if m.canon_kernel < 1:
        raise ConfigError(f"model.canon_kernel={m.canon_kernel} must be at least 1")
    if head_dim(m) % 2 and m.positions == "rope" and m.rope_fraction == 1.0:
        raise ConfigError(f"model.positions='rope' needs an even head dim, got {head_dim(m)}")
    if not 0.0 < m.rope_fraction <= 1.0:
        raise ConfigError(f"model.rope_fraction={m.rope_fraction} must be in (0, 1] (the rotated share of each head)")
    if m.positions == "rope" and (rope_dims(m) % 2 or rope_dims(m) == 0):
        raise ConfigError(
            f"model.rope_fraction={m.rope_fraction} rotates int({head_dim(m)} * {m.rope_fraction}) = {rope_dims(m)} "
            "dims of each head; that must be a positive even number: choose another rope_fraction")
    if m.rope_scaling != "none" and m.rope_factor <= 0:
        raise ConfigError(
            f"model.rope_factor={m.rope_factor} must be positive with model.rope_scaling={m.rope_scaling!r}")
    if m.rope_scaling == "llama3" and not (0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                                           and m.rope_original_max_len > 0):
        raise ConfigError(
            f"model.rope_scaling='llama3' needs 0 < model.rope_low_freq_factor ({m.rope_low_freq_factor}) < "
            f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) and a positive "
            f"model.rope_original_max_len ({m.rope_original_max_len}); Llama 3.1 uses 1, 4 and 8192")
    nonnegative = {"model.attn_scale": m.attn_scale, "model.attn_softcap": m.attn_softcap,
                   "model.final_softcap": m.final_softcap, "model.sliding_window": m.sliding_window,
                   "model.deepnorm_alpha": m.deepnorm_alpha}
    _require(nonnegative, lambda v: v >= 0, ">= 0", "0 keeps the default: off, or the standard value")
    if m.window_pattern and not m.sliding_window:
        raise ConfigError(
            f"model.window_pattern={list(m.window_pattern)} has no effect without a window: "
            "set model.sliding_window to the window length, or clear model.window_pattern")
    if m.attention_impl in ("jax_nn", "cudnn") and m.attn_softcap:
        raise ConfigError(f"model.attention_impl={m.attention_impl!r} (jax.nn.dot_product_attention) has no logit "
                          "softcap, and model.attn_softcap is set; use model.attention_impl=causal_blocks, xla or chunked")
    if m.attention_impl == "cpu_kernel" and (m.dtype != "float32" or head_dim(m) % 16):
        raise ConfigError(f"model.attention_impl='cpu_kernel' computes in float32 with a head dim that is a multiple "
                          f"of 16 (model.dtype={m.dtype!r}, head dim {head_dim(m)}); use model.attention_impl=auto")
    if m.canon_impl == "cpu_kernel" and m.canon and m.dtype != "float32":
        raise ConfigError(f"model.canon_impl='cpu_kernel' computes in float32 and model.dtype={m.dtype!r}; "
                          "use model.canon_impl=auto (xla where the kernel does not apply)")
    if o.update_impl == "cpu_kernel" and m.param_dtype != "float32" and m.adapter.kind == "none":
        raise ConfigError(f"optim.update_impl='cpu_kernel' updates float32 parameters and model.param_dtype="
                          f"{m.param_dtype!r}; use optim.update_impl=auto (optax where the kernel does not apply)")
    if m.matmul_impl == "mkl" and m.dtype != "float32":
        raise ConfigError(f"model.matmul_impl='mkl' computes in float32 (model.dtype={m.dtype!r}); use "
                          "model.matmul_impl=auto")
    if m.attention_impl == "cudnn" and m.dtype != "bfloat16":
        raise ConfigError(f"model.attention_impl='cudnn' (flash attention) computes in half precision; set "
                          f"model.dtype=bfloat16 (now {m.dtype!r}) or use model.attention_impl=auto")
    if len(set(m.bias_projections)) != len(m.bias_projections):
        raise ConfigError(f"model.bias_projections={list(m.bias_projections)} names a projection twice")
    _validate_adapter(m)
    _validate_recursion(m)
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's context "
            f"model.max_seq_len={m.max_seq_len}; lower data.seq_len or raise model.max_seq_len")
    if cfg.data.batch_size % cfg.train.microbatches:
        raise ConfigError(
            f"train.microbatches={cfg.train.microbatches} must divide data.batch_size={cfg.data.batch_size}")
    bad = set(cfg.optim.no_decay) - {"norm", "bias", "embed"}
    if bad:
        raise ConfigError(f"optim.no_decay has {sorted(bad)}; allowed: ['norm', 'bias', 'embed']")
    _require({"data.val_fraction": cfg.data.val_fraction}, lambda v: 0 <= v < 1, "in [0, 1)")
    d = cfg.data.depo
    if not 2 <= d.min_nodes <= d.max_nodes:
        raise ConfigError(f"data.depo needs 2 <= min_nodes <= max_nodes, got {d.min_nodes}, {d.max_nodes}")
    if not 1 <= d.min_name_len <= d.max_name_len:
        raise ConfigError("data.depo needs 1 <= min_name_len <= max_name_len")
    if not 0.0 <= m.mix_alpha <= 1.0:
        raise ConfigError(f"model.mix_alpha={m.mix_alpha} must be in [0, 1] (the Post-LN fraction of layers)")
    if d.max_hops < 1:
        raise ConfigError(f"data.depo.max_hops={d.max_hops} must be at least 1")
    _validate_sft(cfg.data.sft)
    profile_range(cfg.train)
    # Imported here: the plan parses layer_norms and raises ConfigError on bad entries.
    from layerjax.model.plan import build_plan

    build_plan(m)


def _validate_sft(s: SFTConfig) -> None:
    if s.template == "jinja" and not s.chat_template.strip():
        raise ConfigError("data.sft.template='jinja' needs data.sft.chat_template, a Jinja chat template "
                          "string (e.g. a tokenizer_config.json's chat_template), or use data.sft.template=simple")
    if s.template == "simple" and s.chat_template:
        raise ConfigError("data.sft.chat_template is set but data.sft.template='simple' ignores it; "
                          "set data.sft.template=jinja to use it, or clear data.sft.chat_template")
    fields = {"data.sft.prompt_field": s.prompt_field, "data.sft.response_field": s.response_field,
              "data.sft.messages_field": s.messages_field}
    for key, value in fields.items():
        if not value:
            raise ConfigError(f"{key} must name a JSONL field, got an empty string")
    named = [s.prompt_field, s.response_field, s.messages_field] + ([s.task_field] if s.task_field else [])
    if len(set(named)) != len(named):
        raise ConfigError(f"data.sft.prompt_field, response_field, messages_field and task_field must be "
                          f"distinct, got {named}")


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.num_heads


def kv_heads(m: ModelConfig) -> int:
    return m.num_kv_heads or m.num_heads


def _validate_adapter(m: ModelConfig) -> None:
    a = m.adapter
    if a.kind == "none":
        return
    if a.rank < 1 or a.alpha <= 0:
        raise ConfigError(f"model.adapter.rank={a.rank} must be >= 1 and model.adapter.alpha={a.alpha} positive")
    if not 0 <= a.dropout < 1:
        raise ConfigError(f"model.adapter.dropout={a.dropout} must be in [0, 1)")
    if not a.targets:
        raise ConfigError("model.adapter.targets is empty: name projections among " + ", ".join(ADAPTER_TARGETS))
    if a.kind == "mole" and set(a.targets) - {"gate", "up", "down"}:
        raise ConfigError(f"model.adapter.kind='mole' puts experts on the MLP only; model.adapter.targets="
                          f"{list(a.targets)} names attention projections: use gate, up, down (or kind=mola)")
    if a.kind in ("mola", "mole"):
        counts = layer_experts(m)
        if a.top_k < 1 or a.top_k > min(counts):
            raise ConfigError(f"model.adapter.top_k={a.top_k} must be between 1 and the fewest experts of any "
                              f"layer ({min(counts)})")
        if a.kind == "mole" and a.top_k != 1:
            raise ConfigError("model.adapter.kind='mole' routes each token to one expert: set model.adapter.top_k=1")


def _validate_recursion(m: ModelConfig) -> None:
    r = m.recursion
    if r.blocks < 0 or r.lora_rank < 0 or r.lora_rank_mlp < -1:
        raise ConfigError(f"model.recursion: blocks={r.blocks}, lora_rank={r.lora_rank} must be >= 0 and "
                          f"lora_rank_mlp={r.lora_rank_mlp} >= -1")
    if not r.blocks:
        if r.lora_rank or r.lora_rank_mlp > 0 or r.exits:
            raise ConfigError("model.recursion.lora_rank / lora_rank_mlp / exits need shared blocks: set "
                              "model.recursion.blocks (e.g. 3 for 6 layers in 2 loops)")
        return
    shared = m.num_layers - (2 if r.pattern.startswith("middle") else 0)
    if shared < r.blocks or shared % r.blocks:
        where = "model.num_layers" if shared == m.num_layers else "model.num_layers - 2 (the middle layers)"
        raise ConfigError(f"model.recursion.blocks={r.blocks} must divide {where} = {shared}: each block runs "
                          f"the same number of times; e.g. blocks={_divisor_hint(shared)}")
    exits, weights = recursion_exits(m), r.exit_weights
    if len(weights) > 1 and len(weights) != len(exits):
        raise ConfigError(f"model.recursion.exit_weights has {len(weights)} entries for {len(exits)} exits "
                          f"(depths {exits}); give one weight per exit, one for all, or none")
    exit_weights(m)


def _divisor_hint(n: int) -> str:
    return " or ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d < n) or "1"


def recursion_exits(m: ModelConfig) -> list[int]:
    """Depths (layers run, 1..num_layers-1) after which an early-exit loss is taken, sorted."""
    r = m.recursion
    if not r.exits:
        return []
    if list(r.exits) == ["loops"]:
        shared = m.num_layers - (2 if r.pattern.startswith("middle") else 0)
        loops = shared // r.blocks
        if r.pattern.endswith("sequence"):  # a loop is not a contiguous run of depths here
            raise ConfigError("model.recursion.exits='loops' needs a cycle pattern; give exit depths instead")
        first = 1 if r.pattern.startswith("middle") else 0
        return [first + r.blocks * (i + 1) for i in range(loops - 1)]
    try:
        depths = [int(e) for e in r.exits]
    except ValueError:
        raise ConfigError(f"model.recursion.exits={list(r.exits)} must be depths (whole numbers) or 'loops'") from None
    if sorted(set(depths)) != depths or not all(1 <= d < m.num_layers for d in depths):
        raise ConfigError(f"model.recursion.exits={depths} must be increasing depths between 1 and "
                          f"model.num_layers - 1 = {m.num_layers - 1} (the last layer's output is always trained)")
    return depths


def exit_weights(m: ModelConfig) -> list[float]:
    """One loss weight per early exit (recursion_exits order); 1 each unless set, and a single
    value applies to every exit."""
    weights, count = m.recursion.exit_weights, len(recursion_exits(m))
    try:
        values = [float(w) for w in weights] if weights else [1.0] * count
        values = values * count if len(values) == 1 else values
    except ValueError:
        raise ConfigError(f"model.recursion.exit_weights={list(weights)} must be numbers") from None
    if any(w < 0 for w in values):
        raise ConfigError(f"model.recursion.exit_weights={values} must be >= 0")
    return values


def layer_experts(m: ModelConfig) -> list[int]:
    """LoRA experts of each layer under mola/mole (0 for plain LoRA or no adapter)."""
    a = m.adapter
    if a.kind not in ("mola", "mole"):
        return [0] * m.num_layers
    try:
        counts = [int(e) for e in a.experts]
    except ValueError:
        raise ConfigError(f"model.adapter.experts={list(a.experts)} must be whole numbers, e.g. 2,4,6,8") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"model.adapter.experts={list(a.experts)} needs at least one expert in every entry")
    if m.num_layers % len(counts):
        raise ConfigError(
            f"model.adapter.experts has {len(counts)} entries, which neither equals nor evenly divides "
            f"model.num_layers={m.num_layers}: give one count per layer or a pattern over equal blocks")
    per_block = m.num_layers // len(counts)
    return [counts[layer // per_block] for layer in range(m.num_layers)]


def rope_dims(m: ModelConfig) -> int:
    """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
    return int(head_dim(m) * m.rope_fraction)


def biased_projections(m: ModelConfig) -> frozenset[str]:
    """The projections that have a bias: all of them under use_bias, else bias_projections."""
    return frozenset(CHOICES["model.bias_projections"]) if m.use_bias else frozenset(m.bias_projections)


def d_ff(m: ModelConfig) -> int:
    if m.d_ff:
        return m.d_ff
    if m.mlp == "gelu":
        return 4 * m.d_model
    return -(-int(8 * m.d_model / 3) // 64) * 64


def profile_range(t: TrainConfig) -> tuple[int, int] | None:
    """train.profile_steps "a-b" (or "a") -> (a, b), 1-based inclusive; None when off."""
    if not t.profile_steps:
        return None
    first, _, last = t.profile_steps.partition("-")
    try:
        span = (int(first), int(last or first))
    except ValueError:
        raise ConfigError(f"train.profile_steps={t.profile_steps!r} must be 'a-b' (steps a to b) or 'a', "
                          "e.g. train.profile_steps=10-12") from None
    if not 1 <= span[0] <= span[1] <= t.steps:
        raise ConfigError(f"train.profile_steps={t.profile_steps!r} must satisfy 1 <= a <= b <= train.steps={t.steps}")
    return span
