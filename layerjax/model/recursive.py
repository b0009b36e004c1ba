"""Converting an untied model into a recursive one (Relaxed Recursive Transformers, Bae et al. 2025).

An untied model of L layers becomes K shared blocks run by a pattern (plan.recursion_map). Each
shared block is initialised from the layers that will share it:

- "stepwise": CYCLE block i takes layer round(i * (S - 1) / (K - 1)) of the S shared depths (evenly
  spaced, first and last included); SEQUENCE block i the first layer of its group;
- "average": the mean of the layers that will share it;
- "lower": the first K shared layers.

Every block parameter (norm gains, biases, canon weights too) follows the same rule; layers that
stay unshared (the ends of the middle patterns) are copied. With relaxation, depth l's LoRA on a
projection starts from the truncated SVD of the residual W_l - W_shared: with our x @ W layout,
W_l - W_shared = U S V^T and a = U_r, b = S_r V_r^T (the paper's B = U_r S_r, A = V_r^T in
PyTorch's W x layout), so that full rank reproduces the untied projection exactly. Only the
projections are relaxed; other per-layer parameters differ from the original unless they agreed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from layerjax.config import Config, ConfigError, ModelConfig
from layerjax.model.plan import Plan, build_plan, recursion_map

INITS = ("stepwise", "average", "lower")

# Projection name -> (block parameter path, how many leading axes form its input width). The
# attention weights are [d, H, K] (q, k, v: input 1 axis) and [H, K, d] (o: input 2 axes).
PROJECTIONS = {"q": ("attn.wq", 1), "k": ("attn.wk", 1), "v": ("attn.wv", 1), "o": ("attn.wo", 2),
               "gate": ("mlp.w_gate", 1), "up": ("mlp.w_up", 1), "down": ("mlp.w_out", 1)}


def block_sources(num_layers: int, blocks: int, pattern: str, init: str) -> dict[int, list[int]]:
    """Unique block -> the source layers its parameters are taken from (averaged if several)."""
    if init not in INITS:
        raise ConfigError(f"--init {init!r} is not one of {list(INITS)}")
    block_of = recursion_map(num_layers, blocks, pattern)
    depths = [layer for layer, b in enumerate(block_of) if b is not None]
    users = {b: [layer for layer in depths if block_of[layer] == b] for b in range(blocks)}
    if init == "average":
        return users
    if init == "lower":
        return {b: [depths[b]] for b in range(blocks)}
    if pattern.endswith("sequence"):  # stepwise: the first layer of each block's group
        return {b: [users[b][0]] for b in range(blocks)}
    spread = len(depths) - 1
    return {b: [depths[round(b * spread / (blocks - 1))] if blocks > 1 else depths[0]] for b in range(blocks)}


def recursive_config(cfg: Config, blocks: int, pattern: str, lora_rank: int = 0, lora_rank_mlp: int = -1,
                     lora_targets: tuple[str, ...] | None = None) -> Config:
    """The untied config with model.recursion set (validated)."""
    from layerjax.config import validate

    m = cfg.model
    if m.recursion.blocks:
        raise ConfigError(f"the model already shares blocks (model.recursion.blocks={m.recursion.blocks}); "
                          "convert an untied model")
    if m.adapter.kind != "none":
        raise ConfigError("the model has fine-tuning adapters (model.adapter.kind="
                          f"{m.adapter.kind!r}); convert its base, or merge a LoRA first")
    recursion = dataclasses.replace(m.recursion, blocks=blocks, pattern=pattern, lora_rank=lora_rank,
                                    lora_rank_mlp=lora_rank_mlp,
                                    lora_targets=tuple(lora_targets or m.recursion.lora_targets))
    out = dataclasses.replace(cfg, model=dataclasses.replace(m, recursion=recursion))
    validate(out)
    return out


def depth_leaves(leaves: dict[str, np.ndarray], plan: Plan) -> dict[str, np.ndarray]:
    """An untied model's per-layer parameters by block path, stacked over all depths [L, ...]."""
    by_suffix: dict[str, list[np.ndarray]] = {}
    for s, _ in enumerate(plan.segments):
        prefix = f"stacks.{s}.blocks."
        for path, leaf in leaves.items():
            if path.startswith(prefix):
                by_suffix.setdefault(path[len(prefix):], []).append(np.asarray(leaf))
    return {suffix: np.concatenate(parts) for suffix, parts in by_suffix.items()}


def _matrix(w: np.ndarray, in_axes: int) -> np.ndarray:
    return np.asarray(w, np.float32).reshape(int(np.prod(w.shape[:in_axes])), -1)


def svd_lora(residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(a [in, rank], b [rank, out]) with a @ b the best rank-`rank` approximation of `residual`
    (zero-padded when rank exceeds the matrix's)."""
    u, s, vt = np.linalg.svd(residual.astype(np.float64), full_matrices=False)
    r = min(rank, s.size)
    a = np.zeros((residual.shape[0], rank))
    b = np.zeros((rank, residual.shape[1]))
    a[:, :r], b[:r] = u[:, :r], s[:r, None] * vt[:r]
    return a.astype(np.float32), b.astype(np.float32)


def convert_params(leaves: dict[str, np.ndarray], src: ModelConfig, dst: ModelConfig, init: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The recursive model's parameters (dotted paths -> arrays) from an untied model's, and the
    relative Frobenius error ||W_l - W_shared - a b|| / ||W_l|| of each relaxed projection, mean over
    depths (without relaxation: of W_shared alone)."""
    src_plan, dst_plan = build_plan(src), build_plan(dst)
    per_depth = depth_leaves(leaves, src_plan)
    r = dst.recursion
    sources = block_sources(dst.num_layers, r.blocks, r.pattern, init)
    out = {path: np.asarray(leaf) for path, leaf in leaves.items() if not path.startswith("stacks.")}
    errors: dict[str, list[float]] = {}
    for s, segment in enumerate(dst_plan.segments):
        prefix = f"stacks.{s}"
        if segment.blocks is None:  # unshared layers: copied
            for suffix, stacked in per_depth.items():
                out[f"{prefix}.blocks.{suffix}"] = stacked[segment.first_layer:segment.first_layer + segment.num_layers]
            continue
        for suffix, stacked in per_depth.items():
            out[f"{prefix}.blocks.{suffix}"] = np.stack([stacked[sources[b]].mean(axis=0)
                                                         for b in range(segment.num_blocks)]).astype(stacked.dtype)
        ranks = {"attn": segment.spec.relax_rank, "mlp": segment.spec.relax_rank_mlp}
        for name, (suffix, in_axes) in PROJECTIONS.items():
            if suffix not in per_depth:
                if name == "up" and "mlp.w_in" in per_depth:  # an ungated MLP's input projection
                    suffix = "mlp.w_in"
                else:
                    continue
            group = "attn" if name in ("q", "k", "v", "o") else "mlp"
            rank = ranks[group] if name in r.lora_targets else 0
            a_list, b_list = [], []
            for slot, layer in enumerate(segment.layers):
                original = _matrix(per_depth[suffix][layer], in_axes)
                residual = original - _matrix(out[f"{prefix}.blocks.{suffix}"][segment.blocks[slot]], in_axes)
                if rank:
                    a, b = svd_lora(residual, rank)
                    a_list.append(a)
                    b_list.append(b)
                    residual = residual - a.astype(np.float64) @ b
                norm = float(np.linalg.norm(original))
                errors.setdefault(name, []).append(float(np.linalg.norm(residual)) / norm if norm else 0.0)
            if rank:
                out[f"{prefix}.relax.{group}.{name}.a"] = np.stack(a_list)
                out[f"{prefix}.relax.{group}.{name}.b"] = np.stack(b_list)
    return out, {name: float(np.mean(e)) for name, e in errors.items()}


def to_recursive(run_dir, out_dir, blocks: int, pattern: str = "cycle", init: str = "stepwise",
                 lora_rank: int = 0, lora_rank_mlp: int = -1, lora_targets: tuple[str, ...] | None = None,
                 step: int | None = None) -> dict:
    """Writes out_dir: an ordinary run directory (config.toml + a weights-only step-0 checkpoint,
    `train.init_from` pointing at itself) holding the recursive conversion of run_dir's checkpoint.
    Every check runs before anything is written. Returns a report (parameter counts, errors)."""
    import pathlib

    from layerjax.config import to_toml
    from layerjax.interop.mapping import param_leaves
    from layerjax.train.checkpoint import ParamsWriter, load_run
    from layerjax.train.state import build_setup

    out_dir = pathlib.Path(out_dir)
    if (out_dir / "checkpoints").is_dir() and any((out_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"--out {out_dir} already holds checkpoints; choose a new directory")
    cfg, setup, params, from_step = load_run(run_dir, step)
    dst_cfg = recursive_config(cfg, blocks, pattern, lora_rank, lora_rank_mlp, lora_targets)
    dst_cfg = dataclasses.replace(dst_cfg, train=dataclasses.replace(
        dst_cfg.train, run_dir=str(out_dir), init_from=str(out_dir)))
    leaves, errors = convert_params(param_leaves(params), cfg.model, dst_cfg.model, init)
    dst_setup = build_setup(dst_cfg)
    expected = param_leaves(dst_setup.abstract_state.params)
    wrong = sorted(set(expected) ^ set(leaves)) + sorted(
        p for p in expected if p in leaves and tuple(leaves[p].shape) != tuple(expected[p].shape))
    if wrong:  # a converter bug, never a user error: say exactly what
        raise AssertionError(f"converted parameters do not fit the recursive model: {wrong[:8]}")
    leaves = {p: np.asarray(v).astype(expected[p].dtype) for p, v in leaves.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    with ParamsWriter(out_dir, step=0) as writer:
        writer.write(leaves)
    (out_dir / "config.toml").write_text(to_toml(dst_cfg))  # last: a run dir with a config is complete
    return {"source": str(run_dir), "source_step": from_step, "run_dir": str(out_dir.resolve()),
            "params_before": setup.num_params, "params_after": dst_setup.num_params,
            "block_sources": block_sources(dst_cfg.model.num_layers, blocks, pattern, init),
            "relative_error": errors}
