"""One process of a multi-process check (launched by test_sharding.py, not collected by pytest).

    python tests/multiprocess_worker.py OUT_JSON COORDINATOR NUM_PROCESSES PROCESS_ID [overrides...]

Starts jax.distributed, builds the config's setup over all processes' devices, feeds the same
fixed global batches every topology sees (each process passes only its own rows) and writes the
per-step losses (process 0).
"""

import json
import sys

import jax


def fixed_batches(cfg, vocab: int, steps: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    for _ in range(steps):
        tokens = rng.integers(0, vocab, (shape[0], shape[1] + 1), dtype=np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones(shape, np.float32),
               "segment_ids": np.ones(shape, np.int32),
               "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


def step_losses(cfg, steps: int = 3) -> list[float]:
    """Losses of `steps` train steps on fixed batches, under cfg's mesh over all processes."""
    from layerjax.train.state import build_setup, init_state, jit_train_step

    setup = build_setup(cfg)
    state = init_state(setup, seed=0)
    train_step = jit_train_step(setup)
    rows = cfg.data.batch_size // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    losses = []
    for batch in fixed_batches(cfg, cfg.model.vocab_size, steps):
        batch = {k: jax.make_array_from_process_local_data(setup.batch_sharding, v[mine]) for k, v in batch.items()}
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


if __name__ == "__main__":
    out, coordinator, num_processes, process_id, *overrides = sys.argv[1:]
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id))
    from layerjax.config import load_config

    losses = step_losses(load_config("default", overrides))
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count(), "processes": jax.process_count()}, f)
