"""The one training loop: the jitted step in the middle, side effects (logs, eval, checkpoints,
signals) at the edges."""

from __future__ import annotations

import json
import math
import pathlib
import signal
import statistics
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from layerjax.config import Config, profile_range, recursion_exits, to_dict, to_toml
from layerjax.data.metrics import exact_match_by_hops, merge_counts
from layerjax.data.pipeline import build_data
from layerjax.diagnostics.layers import layer_eval, make_layer_eval_steps, make_layer_stats_step
from layerjax.diagnostics.plots import plot_expert_usage, plot_layers
from layerjax.diagnostics.router import ROUTER_SERIES, router_log
from layerjax.train.checkpoint import Checkpointer, load_params
from layerjax.train.finetune import checkpoint_view, frozen_base, is_finetune, new_finetune_state
from layerjax.train.flops import flops_per_token, measure_peak_flops
from layerjax.train.memory import check_fits
from layerjax.train.metrics import MetricsWriter, read_metrics
from layerjax.train.plots import plot_curves
from layerjax.train.profiling import StepProfiler
from layerjax.train.progress import Progress
from layerjax.train.rundir import (RunLock, check_resume_config, metrics_before, read_summary, relocate_tokenizer,
                                   saved_config, trim_metrics, write_atomic)
from layerjax.train.state import (Setup, build_setup, init_state, jit_params_step, jit_train_step, resolve_vocab,
                                  state_from_params)
from layerjax.train.step import LOSS_INPUTS, MODEL_INPUTS, join_trainable, make_eval_step


MAX_BUCKET = 64  # answer buckets (Depo hops, Mano length, ...) gathered across processes


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss, gradient or update and train.on_nonfinite='stop', or
    (with 'skip') too many updates in a row or in all were dropped."""


def describe_nonfinite(metrics) -> str:
    """Which of the step's loss, gradient norm and update norm were not finite, with the values."""
    values = {name: float(metrics[name]) for name in ("loss", "grad_norm", "update_norm")}
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    shown = ", ".join(f"{name}={v:.4g}" for name, v in values.items())
    if bad == ["update_norm"]:
        return f"the optimizer update is not finite although the loss and the gradient are ({shown})"
    return f"non-finite {' and '.join(bad or ['values'])} ({shown})"


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    """Steps of the checkpoints in a run directory, read from the file names (nothing is opened)."""
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, so the loop can save a
    checkpoint before exiting. A second signal falls back to the default behaviour."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def to_global(batch: dict[str, np.ndarray], setup: Setup, keys=LOSS_INPUTS) -> dict[str, jax.Array]:
    """This process's rows of the batch -> one global array per key, split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, batch[k]) for k in keys}


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it fed them."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {s.index[0].start or 0: np.asarray(s.data) for s in x.addressable_shards}
    return np.concatenate([shards[start] for start in sorted(shards)])


def evaluate(setup: Setup, eval_step, params, batches: list[dict], score=exact_match_by_hops) -> dict[str, float]:
    """Validation loss and perplexity over the fixed eval batches, plus exact-match accuracy of
    the task's answers (overall and per hop count) where the data defines answers."""
    exits = recursion_exits(setup.cfg.model)
    ce_sum, weight, exit_ce = 0.0, 0.0, np.zeros(len(exits))
    counts: dict[int, tuple[int, int]] = {}
    exit_counts: list[dict[int, tuple[int, int]]] = [{} for _ in exits]
    for batch in batches:
        out = eval_step(params, to_global(batch, setup, (*MODEL_INPUTS, "targets", "weights")))
        ce_sum += float(out["ce_sum"])
        weight += float(out["weight"])
        counts = merge_counts(counts, score(local_rows(out["predictions"]), batch))
        for i in range(len(exits)):  # each early exit scored like the last layer
            exit_ce[i] += float(out["exit_ce_sums"][i])
            exit_counts[i] = merge_counts(exit_counts[i], score(local_rows(out["exit_predictions"][i]), batch))
    loss = ce_sum / max(weight, 1.0)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), **_accuracies(counts)}
    for i, depth in enumerate(exits):
        result[f"loss_exit{depth}"] = exit_ce[i] / max(weight, 1.0)
        result.update({f"{k}_exit{depth}": v for k, v in _accuracies(exit_counts[i]).items() if k == "accuracy"})
    return result


def _accuracies(counts: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Exact match overall and per bucket from (correct, total) counts, summed over processes."""
    if jax.process_count() > 1:  # every process scored its own rows: add up the counts
        hops = range(1, MAX_BUCKET + 1)
        local = np.array([counts.get(k, (0, 0)) for k in hops], np.int64)
        total = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
        counts = {k: (int(c), int(n)) for k, (c, n) in zip(hops, total) if n}
    if not counts:
        return {}
    correct = sum(c for c, _ in counts.values())
    total = sum(n for _, n in counts.values())
    return {"accuracy": correct / max(total, 1),
            **{f"accuracy_k{k}": c / max(n, 1) for k, (c, n) in sorted(counts.items())}}


def metric_label(key: str, buckets: dict[int, str] | None) -> str:
    """accuracy_k2 -> accuracy[mano] where the buckets have names (sft tasks)."""
    if buckets and key.startswith("accuracy_k") and int(key.removeprefix("accuracy_k")) in buckets:
        return f"accuracy[{buckets[int(key.removeprefix('accuracy_k'))]}]"
    return key


def _format_summary(summary: dict) -> str:
    lines = ["", "=== run summary ==="]
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {key:<22} {shown}")
    return "\n".join(lines)


def train(cfg: Config, stop_at_step: int | None = None, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) training as configured and returns the final summary.

    One process at a time trains in a run directory (process 0 holds its lock). A resume must use
    the config that trained the run: changes to the model or the data are refused, and changes
    to the optimisation (train.steps, optim.*) need allow_config_change; nothing is written
    before that check. A finished run is left as it is and its summary returned.

    stop_at_step: behave as if preempted after that step (checkpoint, then return), for
    preemption drills and resume tests; a later call resumes from there.
    """
    run_dir = pathlib.Path(cfg.train.run_dir)
    lock = RunLock(run_dir).acquire() if jax.process_index() == 0 else None
    try:
        return _train(cfg, run_dir, stop_at_step, allow_config_change)
    finally:
        if lock is not None:
            lock.release()


def _finished_summary(run_dir: pathlib.Path, latest: int, cfg: Config) -> dict | None:
    """The saved summary of a run that completed train.steps, else None."""
    summary = read_summary(run_dir)
    if (latest >= cfg.train.steps and summary is not None and summary.get("stopped_by") == "completed"
            and summary.get("steps") == latest):
        return summary
    return None


def _restore(checkpointer: Checkpointer, step: int, setup: Setup, run_dir: pathlib.Path):
    """(state, data iterator state or None) from checkpoint `step`, full or weights-only."""
    cfg = setup.cfg
    if not checkpointer.has_train_state(step):  # weights only (an imported model): fresh optimizer and data
        params = checkpointer.restore_params(step, setup.abstract_state.params, setup.state_shardings.params)
        return state_from_params(setup, params, cfg.train.seed, step), None
    # A fine-tune's checkpoint holds its adapters only; the frozen base is read back from its run.
    state, data_state = checkpointer.restore(step, checkpoint_view(setup.abstract_state, cfg.model),
                                             checkpoint_view(setup.state_shardings, cfg.model))
    if is_finetune(cfg.model):
        state = state.replace(params=join_trainable(state.params, frozen_base(setup, run_dir)))
    return state, data_state


def _write_config(run_dir: pathlib.Path, cfg: Config, previous: Config | None, changes: list[str],
                  resumed_from: int | None) -> None:
    """config.toml, written whole; the config it replaces on an allowed change is kept beside it."""
    if previous is not None and changes and resumed_from is not None:
        (run_dir / "config.toml").replace(run_dir / f"config.before_step{resumed_from}.toml")
    write_atomic(run_dir / "config.toml", to_toml(relocate_tokenizer(cfg, run_dir)))


def _train(cfg: Config, run_dir: pathlib.Path, stop_at_step: int | None, allow_config_change: bool) -> dict:
    is_main = jax.process_index() == 0
    saved = checkpoint_steps(run_dir)
    previous = saved_config(run_dir) if saved else None
    changes: list[str] = []
    if previous is not None:  # a resume: refuse a changed config before anything is written
        changes = check_resume_config(run_dir, previous, cfg, allow_config_change)
        finished = _finished_summary(run_dir, saved[-1], cfg)
        if finished is not None:
            if is_main:
                print(f"layerjax: {run_dir} already finished at step {saved[-1]}; nothing to do (every file is "
                      "kept). To train further, raise train.steps and add --allow-config-change.", flush=True)
            return finished

    data = build_data(cfg, jax.process_index(), jax.process_count())
    cfg = resolve_vocab(cfg, data.vocab_size)
    check_fits(cfg)  # a model that cannot fit is refused before anything is allocated
    setup = build_setup(cfg)

    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    train_iter = data.train_iterator()
    eval_batches = data.eval_batches()
    finetune = is_finetune(cfg.model)
    resumed_from, restored = checkpointer.restore_newest_readable(lambda at: _restore(checkpointer, at, setup, run_dir))
    if restored is not None:
        state, data_state = restored
        if data_state is not None:
            train_iter.set_state(data_state)
    elif finetune:
        state = new_finetune_state(setup, run_dir, is_main)
        if is_main and cfg.train.init_from:
            print(f"layerjax: fine-tuning adapters on the frozen base {cfg.train.init_from}", flush=True)
    elif cfg.train.init_from:
        params, from_step = load_params(cfg.train.init_from, setup)
        state = state_from_params(setup, params, cfg.train.seed)
        if is_main:
            print(f"layerjax: parameters from {cfg.train.init_from} (step {from_step})", flush=True)
    else:
        state = init_state(setup, cfg.train.seed)
    resumed_training = restored is not None and restored[1] is not None  # not a weights-only start

    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    if is_main:
        _write_config(run_dir, cfg, previous, changes, resumed_from)
        for change in changes:
            print(f"layerjax: config change accepted on resume: {change}", flush=True)
        # Rows past the restored step are replayed by this run: keep each step once.
        trim_metrics(run_dir, resumed_from)
        last_train = metrics_before(read_metrics(run_dir, "train"))
        last_eval = metrics_before(read_metrics(run_dir, "eval"))

    train_step = jit_train_step(setup)
    eval_step = jit_params_step(setup, make_eval_step(setup.graphdef))
    layer_stats_step = jit_params_step(setup, make_layer_stats_step(setup.graphdef, setup.plan))
    layer_eval_steps = make_layer_eval_steps(setup.graphdef) if cfg.logging.layer_eval else None

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    model_flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = peak_flops(cfg)
    writer = MetricsWriter(run_dir, cfg.logging.tensorboard, to_toml(cfg), cfg.logging.wandb_project,
                           cfg.logging.wandb_entity, to_dict(cfg)) if is_main else None

    step = int(state.step)
    if is_main:
        note = f"resumed from step {resumed_from}" if resumed_from is not None else "new run"
        print(f"layerjax: {note}; {setup.num_params / 1e6:.2f}M params, {len(setup.plan.segments)} segment(s), "
              f"{setup.mesh.size} device(s), run dir {run_dir.resolve()}", flush=True)
    last_saved = resumed_from
    step_rates: list[float] = []
    pending = None  # (step, metrics) of the previous step, checked one step behind
    skips = SkipCounter(cfg, int(last_train.get("skipped_updates", 0)) if resumed_training else 0, step)
    window_start, window_steps = time.perf_counter(), 0
    progress = Progress(cfg.train.steps, step, bar=cfg.logging.progress, talk=is_main)  # only process 0 talks
    say = progress.write
    profiler = StepProfiler(profile_range(cfg.train), run_dir, say)

    def where() -> str:
        return (f"the last good checkpoint is step {last_saved} in {checkpointer.directory}"
                if last_saved is not None else "no checkpoint was saved yet")

    def check_finite(step_metrics):
        at, metrics = step_metrics
        if cfg.train.on_nonfinite == "skip":
            problem = skips.record(at, metrics)
            if problem:
                raise NonFiniteError(f"step {at}: {problem}; {where()}. Lower optim.lr, raise optim.warmup_steps, "
                                     "or check the data")
            return
        if not bool(metrics["finite"]):
            raise NonFiniteError(
                f"step {at}: {describe_nonfinite(metrics)}; {where()}. Lower optim.lr, raise optim.warmup_steps, "
                "or set train.on_nonfinite=skip to drop such updates")

    def run_eval(at: int) -> dict[str, float]:
        result = evaluate(setup, eval_step, state.params, eval_batches, data.score)
        if writer:
            writer.write(at, "eval", result)
        say(f"step {at}: eval " + ", ".join(f"{metric_label(k, data.buckets)}={v:.4g}" for k, v in result.items()))
        if layer_eval_steps is not None:
            global_batches = [to_global(b, setup, (*MODEL_INPUTS, "targets", "weights")) for b in eval_batches]
            layers = layer_eval(layer_eval_steps, state.params, global_batches, cfg.model.num_layers)
            if writer:
                writer.write(at, "eval_layers", layers)
        return result

    def save(at: int):
        nonlocal last_saved
        checkpointer.save(at, checkpoint_view(state, cfg.model), train_iter.get_state())
        last_saved = at

    with StopRequest() as stop:
        try:
            if resumed_from is None and cfg.train.eval_every:
                last_eval = run_eval(0)  # the loss at initialization, a reference for every curve
                window_start = time.perf_counter()
            while step < cfg.train.steps:
                batch = to_global(next(train_iter), setup)
                profiler.before(step + 1)
                state, metrics = train_step(state, batch)
                step += 1
                profiler.after(step, metrics)
                window_steps += 1
                if pending is not None:
                    check_finite(pending)
                pending = (step, metrics)
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    check_finite(pending)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_sec = window_steps * tokens_per_step / elapsed
                    values = jax.device_get(metrics)
                    router = {k: values.pop(k) for k in ROUTER_SERIES if k in values}
                    values = {k: float(v) for k, v in values.items() if k != "finite"}
                    if router and writer:  # per layer: each expert's share of assignments, router entropy
                        writer.write(step, "router", router_log(router))
                    values.update(tokens_per_sec=tokens_per_sec, step_time=elapsed / window_steps,
                                  mfu=model_flops_per_step * window_steps / elapsed / peak,
                                  skipped_updates=skips.total)
                    if step > cfg.train.log_every or resumed_from is not None:
                        step_rates.append(tokens_per_sec)  # the first window includes compilation
                    last_train = values
                    if writer:
                        writer.write(step, "train", values)
                    progress.log(step, values)
                    window_start, window_steps = time.perf_counter(), 0
                every = cfg.logging.layer_stats_every
                if every and (step % every == 0 or step == cfg.train.steps):
                    layers = jax.device_get(layer_stats_step(state.params, batch))
                    if writer:
                        writer.write(step, "layers", {k: np.asarray(v).tolist() for k, v in layers.items()})
                    window_start = time.perf_counter()  # diagnostics time is not step time
                if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                    last_eval = run_eval(step)
                    window_start = time.perf_counter()  # eval time is not step time
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    check_finite(pending)
                    save(step)
                if stop_at_step is not None and step >= stop_at_step and not stop.signal_name:
                    stop.signal_name = "stop_at_step"
                if stop.signal_name:
                    check_finite(pending)
                    if last_saved != step:  # the periodic save may have just written this step
                        save(step)
                    say(f"{stop.signal_name}: saved a checkpoint at step {step}; "
                                   "run the same command again to resume")
                    break
            else:
                if pending is not None:
                    check_finite(pending)
                if last_saved != step:
                    save(step)
        finally:
            profiler.close(step)
            progress.close()
            checkpointer.close()
            if writer:
                writer.close()

    summary = {
        "steps": step,
        "stopped_by": stop.signal_name or "completed",
        "train_loss": last_train.get("loss", float("nan")),
        "val_loss": last_eval.get("loss", float("nan")),
        "val_perplexity": last_eval.get("perplexity", float("nan")),
    }
    summary.update({f"val_{k}": v for k, v in last_eval.items() if k.startswith(("accuracy", "loss_exit"))})
    if is_main and cfg.train.eval_every:
        first_eval = read_metrics(run_dir, "eval")[:1]
        if first_eval and first_eval[0]["step"] == 0:
            summary["initial_val_loss"] = first_eval[0]["loss"]
            if "accuracy" in first_eval[0]:
                summary["initial_val_accuracy"] = first_eval[0]["accuracy"]
    if data.chance_accuracy is not None:
        summary["chance_accuracy"] = data.chance_accuracy
    rate = statistics.median(step_rates) if step_rates else last_train.get("tokens_per_sec", float("nan"))
    summary.update(tokens_per_sec=rate, mfu=rate * model_flops_per_step / tokens_per_step / peak,
                   peak_flops=peak, params=setup.num_params, trainable_params=setup.num_trainable,
                   skipped_updates=skips.total, run_dir=str(run_dir.resolve()), last_checkpoint=last_saved)
    if last_saved is not None:
        summary["checkpoint_mib"] = checkpointer.step_bytes(last_saved) / 2**20
    if data.buckets:  # exact-match bucket -> task name (sft), for reports
        summary["buckets"] = {str(k): v for k, v in sorted(data.buckets.items())}
    if is_main:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        summary["plot"] = str(plot_curves(run_dir, summary.get("chance_accuracy")))
        experts_plot = plot_expert_usage(run_dir)
        if experts_plot is not None:
            summary["experts_plot"] = str(experts_plot)
        layers_plot = plot_layers(run_dir)
        if layers_plot is not None:
            summary["layers_plot"] = str(layers_plot)
        print(_format_summary(summary), flush=True)
    return summary


def peak_flops(cfg: Config) -> float:
    """The FLOP/s MFU divides by, for all devices together: logging.peak_flops per device, or a
    matmul probe in the compute dtype (bf16 runs peak higher than float32 ones)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    # Simulated CPU devices share one host's cores, so the machine's peak counts once per process.
    devices = jax.process_count() if on_cpu else jax.device_count()
    return (cfg.logging.peak_flops or measure_peak_flops(dtype=cfg.model.dtype)) * devices


class SkipCounter:
    """Counts the updates train.on_nonfinite='skip' dropped and says when there are too many:
    more than train.max_skipped_in_row in a row, or more than train.max_skipped_fraction of the
    steps this run took (from step 20 on)."""

    MIN_STEPS = 20

    def __init__(self, cfg: Config, total: int, first_step: int):
        self.cfg = cfg.train
        self.total, self.in_row, self.first_step, self.seen_upto = total, 0, first_step, first_step

    def record(self, at: int, metrics) -> str | None:
        if at <= self.seen_upto:  # the same step may be checked again before a save or a log line
            return None
        self.seen_upto = at
        if bool(metrics["finite"]):
            self.in_row = 0
            return None
        self.total += 1
        self.in_row += 1
        run = at - self.first_step
        if self.cfg.max_skipped_in_row and self.in_row > self.cfg.max_skipped_in_row:
            return (f"{self.in_row} updates in a row were dropped as non-finite (train.max_skipped_in_row="
                    f"{self.cfg.max_skipped_in_row}); the last: {describe_nonfinite(metrics)}")
        if run >= self.MIN_STEPS and self.total > self.cfg.max_skipped_fraction * at:
            return (f"{self.total} of {at} updates were dropped as non-finite (more than train.max_skipped_fraction="
                    f"{self.cfg.max_skipped_fraction}); the last: {describe_nonfinite(metrics)}")
        return None
