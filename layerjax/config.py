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
    "model.remat": ("none", "full", "save_matmuls"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.qk_norm_scope": ("head", "full"),
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
    "mesh.rules": ("dp", "fsdp", "fsdp_tp", "tp", "custom"),
    "train.on_nonfinite": ("stop", "skip"),
}


ADAPTER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class AdapterConfig:
    """Low-rank adapters for fine-tuning a frozen base: LoRA, MoLA (LoRA experts on every targeted
    projection, their number varying with depth) or MoLE (experts on the MLP, one router per layer)."""

    kind: str = "none"  # none | lora | mola | mole
    targets: tuple[str, ...] = ADAPTER_TARGETS  # projections that get an adapter (mole: the MLP ones)
    rank: int = 8
    alpha: float = 16.0  # the delta is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    rslora: bool = False
    dropout: float = 0.05  # on the adapter's input (the router reads it before dropout)
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
    # Per-depth relaxation W_shared x + B_l A_l x (scale 1) on these projections; 0: none.
    lora_rank: int = 0  # rank on the attention projections (q, k, v, o)
    lora_rank_mlp: int = -1  # rank on the MLP projections (gate, up, down); -1: lora_rank
    lora_targets: tuple[str, ...] = ADAPTER_TARGETS
    # Early exit: extra losses on the shared head (through the final norm) after these depths
    # (counted in layers run, 1..num_layers-1), or "loops" for after every loop but the last.
    exits: tuple[str, ...] = ()
    exit_weights: tuple[str, ...] = ()  # one weight per exit, or one for all (default 1); the last layer's loss weighs 1


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the data source's tokenizer
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 0  # 0: 4*d_model for gelu, 8/3*d_model rounded up to a multiple of 64 for swiglu/geglu
    max_seq_len: int = 256
    positions: str = "rope"
    rope_theta: float = 10000.0
    # RoPE frequency scaling as Hugging Face computes it: "linear" divides every frequency by
    # rope_factor; "llama3" divides only the low ones, blending between the two wavelength bounds
    # rope_original_max_len / rope_low_freq_factor and rope_original_max_len / rope_high_freq_factor.
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # linear and llama3: the context extension factor
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the context length the model was trained at
    rope_fraction: float = 1.0  # partial RoPE (GPT-NeoX): rotate the first int(head_dim * this) dims
    mlp: str = "swiglu"  # swiglu and geglu are gated (silu / tanh-GELU on the gate); gelu is not
    norm_type: str = "rms"
    norm: str = "pre"  # norm scheme of every layer, unless layer_norms overrides it
    mix_alpha: float = 0.25  # norm=mix: the first floor(mix_alpha * num_layers) layers are Post-LN
    deepnorm_alpha: float = 0.0  # norm=deepnorm: the residual multiplier; 0: (2 * num_layers)^(1/4)
    # Per-layer scheme overrides, "first-last:scheme" with 0-based inclusive layer indices,
    # e.g. ("0-2:post",); any scheme but mix. Neighbouring equal layers share one scanned segment.
    layer_norms: tuple[str, ...] = ()
    embed_norm: bool = False  # a norm on the embedding output (optional in Peri-LN)
    norm_eps: float = 1e-6
    norm_offset: bool = False  # every norm computes x_hat * (1 + w), w initialised to 0 (Gemma)
    qk_norm: bool = False
    # "head": each head's q and k normalised over head_dim (Qwen3); "full": all of a token's q
    # (heads * head_dim values) and all of its k with one norm each (OLMo-2).
    qk_norm_scope: str = "head"
    attn_scale: float = 0.0  # multiplier of q.k; 0: head_dim^-0.5 (Gemma-2: query_pre_attn_scalar^-0.5)
    attn_softcap: float = 0.0  # 0: off; else attention logits become cap * tanh(logits / cap)
    final_softcap: float = 0.0  # 0: off; else output logits become cap * tanh(logits / cap)
    # Keys a query sees in a sliding-window layer: itself and the W-1 before it (0: no window).
    sliding_window: int = 0
    # Which layers slide, as a cycle of "local" / "global" (layer l takes entry l % len), e.g.
    # ("local", "global") for Gemma-2; empty: every layer is local when sliding_window > 0.
    window_pattern: tuple[str, ...] = ()
    # Canon layers (Physics of LMs 4.1): any of "A" (before attention, after its norm), "B" (on
    # q, k, v before RoPE), "C" (before the MLP, after its norm), "D" (on the MLP's hidden
    # pre-activation), e.g. "ABCD". Causal depthwise conv of canon_kernel taps.
    canon: str = ""  # "" or "none": no canon layers
    canon_kernel: int = 4
    canon_residual: bool = True
    canon_bias: bool = False
    canon_activation: bool = False  # SiLU on the convolution
    canon_trainable: bool = True  # false: canon weights stay at their random init (frozen)
    final_norm: bool = True
    use_bias: bool = False  # a bias on every projection and every norm (GPT-2)
    # Projections with a bias when use_bias is false: any of "q", "k", "v", "o" (attention), "up"
    # (the MLP's input side: gate and up, or w_in) and "down" (its output), e.g. Qwen2's q, k, v.
    bias_projections: tuple[str, ...] = ()
    embed_scale: bool = False  # multiply the token embeddings by sqrt(d_model) (Gemma; not the tied head)
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Packed rows hold several documents; with this on, attention never crosses a document.
    document_mask: bool = True
    scan_layers: bool = True  # False: unrolled python loop over layers (for debugging)
    remat: str = "none"
    dtype: str = "float32"  # compute dtype; norm statistics, softmax and RoPE angles stay float32
    param_dtype: str = "float32"  # dtype parameters (and so the optimizer state) are stored in
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    recursion: RecursionConfig = field(default_factory=RecursionConfig)


@dataclass(frozen=True)
class DepoConfig:
    """Depo (Physics of LMs 4.1): k-th successor queries over random directed cycles."""

    min_nodes: int = 4  # nodes per cycle
    max_nodes: int = 8
    num_cycles: int = 1  # cycles per sample
    max_hops: int = 4  # k is drawn from 1..max_hops
    queries: int = 1  # queries per sample
    name_vocab: int = 32  # distinct tokens names are spelled with
    min_name_len: int = 1
    max_name_len: int = 2


@dataclass(frozen=True)
class BrevoConfig:
    """Brevo (Physics of LMs 4.1): list all ancestors of a query node of a random DAG."""

    min_nodes: int = 5
    max_nodes: int = 8  # the longest sample (125 tokens) fits data.seq_len=128
    max_degree: int = 4  # in- and out-degree bound
    name_vocab: int = 32  # single-token node names, distinct within a sample


@dataclass(frozen=True)
class ManoConfig:
    """Mano (Physics of LMs 4.1): prefix-notation +, -, x expressions mod `modulus`."""

    min_ops: int = 1  # operators per expression (L), drawn uniformly from min_ops..max_ops
    max_ops: int = 4
    modulus: int = 23


@dataclass(frozen=True)
class RecallConfig:
    """Associative recall: key-value pairs, then queries for some keys' values."""

    pairs: int = 16
    queries: int = 4
    num_keys: int = 64  # distinct key tokens (keys in a sample are distinct)
    num_values: int = 64


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning records (data.source=sft; README "Supervised fine-tuning data")."""

    prompt_field: str = "prompt"  # JSONL field of a prompt/response record's prompt
    response_field: str = "response"  # ... and of its response (the trained part)
    messages_field: str = "messages"  # JSONL field of a chat record: a list of {role, content}
    task_field: str = "task"  # optional per-record task name: one exact-match bucket per task; "" ignores it
    template: str = "simple"  # "simple": <|user|>/<|assistant|> markers; "jinja": data.sft.chat_template
    chat_template: str = ""  # template=jinja: a Hugging Face style Jinja chat template over `messages`
    overlong: str = "drop"  # a sample longer than data.seq_len: "drop", "truncate" (its end) or "error"


@dataclass(frozen=True)
class DataConfig:
    source: str = "depo"
    seq_len: int = 128
    batch_size: int = 32  # global batch, in sequences
    seed: int = 0
    paths: tuple[str, ...] = ()  # source=text: .txt, .jsonl or .parquet files; source=sft: .jsonl files
    text_field: str = "text"  # for .jsonl / .parquet
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    val_fraction: float = 0.05
    synthetic_vocab: int = 4096  # for source=synthetic_random
    num_eval_batches: int = 8
    depo: DepoConfig = field(default_factory=DepoConfig)
    brevo: BrevoConfig = field(default_factory=BrevoConfig)
    mano: ManoConfig = field(default_factory=ManoConfig)
    recall: RecallConfig = field(default_factory=RecallConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameter kinds spared from weight decay: any of "norm", "bias", "embed".
    no_decay: tuple[str, ...] = ("norm", "bias")
    clip_norm: float = 1.0  # 0 disables global-norm clipping


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    microbatches: int = 1  # gradient accumulation inside the step
    seed: int = 0
    z_loss: float = 0.0
    # A non-finite loss or gradient: "stop" ends the run naming the last good checkpoint;
    # "skip" drops that update and goes on.
    on_nonfinite: str = "stop"
    log_every: int = 20
    eval_every: int = 200
    run_dir: str = "runs/default"
    # A run directory (e.g. one written by tools/import_hf.py) whose latest checkpoint's parameters
    # start this run when train.run_dir has no checkpoint yet; the optimizer state starts fresh.
    init_from: str = ""


@dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis. 0: unset (1, or all remaining devices for the axis the rules preset
    splits the batch over); -1: all remaining devices (at most one axis)."""

    data: int = 0
    fsdp: int = 0
    expert: int = 0
    tensor: int = 0


@dataclass(frozen=True)
class MeshConfig:
    # Logical-axis rules preset (layerjax/sharding.py): dp, fsdp, fsdp_tp, tp, or custom.
    rules: str = "dp"
    shape: MeshShape = field(default_factory=MeshShape)
    # rules=custom: "logical=axis[+axis]" entries, e.g. ["batch=data+fsdp", "embed=fsdp", "mlp=tensor"].
    custom_rules: tuple[str, ...] = ()
    num_devices: int = 0  # 0: all global devices; fewer: the first N (single process only)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # 0 disables periodic checkpoints (the final one is still written)
    keep: int = 2
    async_save: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True
    # Per-layer gradient norms and residual-stream statistics every N steps, from one extra
    # forward/backward pass on the step's batch (0: off; cheap for small models).
    layer_stats_every: int = 0
    # At each eval: the angular-distance heatmap between all layers' hidden states and each
    # layer's removal sensitivity (one extra eval pass per layer).
    layer_eval: bool = False


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)



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
    parent = raw.pop("extends", None)
    if parent:
        return _merge(load_preset(parent, _seen + (path,)), raw)
    return raw


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
    cfg = _apply(cfg, parse_overrides(overrides))
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
    m = cfg.model
    positive = {
        "model.num_layers": m.num_layers, "model.d_model": m.d_model, "model.num_heads": m.num_heads,
        "model.max_seq_len": m.max_seq_len, "data.seq_len": cfg.data.seq_len,
        "data.batch_size": cfg.data.batch_size, "train.steps": cfg.train.steps,
        "train.microbatches": cfg.train.microbatches, "train.log_every": cfg.train.log_every,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
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
    for key, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0 (0 keeps the default: off, or the standard value)")
    if m.window_pattern and not m.sliding_window:
        raise ConfigError(
            f"model.window_pattern={list(m.window_pattern)} has no effect without a window: "
            "set model.sliding_window to the window length, or clear model.window_pattern")
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
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    d = cfg.data.depo
    if not 2 <= d.min_nodes <= d.max_nodes:
        raise ConfigError(f"data.depo needs 2 <= min_nodes <= max_nodes, got {d.min_nodes}, {d.max_nodes}")
    if not 1 <= d.min_name_len <= d.max_name_len:
        raise ConfigError("data.depo needs 1 <= min_name_len <= max_name_len")
    if not 0.0 <= m.mix_alpha <= 1.0:
        raise ConfigError(f"model.mix_alpha={m.mix_alpha} must be in [0, 1] (the Post-LN fraction of layers)")
    if cfg.logging.layer_stats_every < 0:
        raise ConfigError(f"logging.layer_stats_every={cfg.logging.layer_stats_every} must be >= 0 (0 turns it off)")
    if d.max_hops < 1:
        raise ConfigError(f"data.depo.max_hops={d.max_hops} must be at least 1")
    _validate_sft(cfg.data.sft)
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
