"""Multi-process start-up on JAX's own runtime (`jax.distributed`), before any device is touched.

Launched by a cluster manager, JAX finds the coordinator itself (SLURM, Open MPI, Cloud TPU pods,
GKE); on a plain machine the three explicit flags do it. A single process needs nothing.
"""

from __future__ import annotations

import os

import jax

# Environment variables that mean "this process is one of several" to jax.distributed's auto-detection.
_CLUSTER_HINTS = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),
}


def cluster_detected(environ=os.environ) -> bool:
    return any(name in environ and hint(environ[name]) for name, hint in _CLUSTER_HINTS.items())


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto") -> bool:
    """Starts the multi-process runtime when asked (mode "on", or the explicit flags) or when a
    cluster launcher is detected (mode "auto"). Returns whether it did."""
    explicit = [coordinator, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together: give all three "
                         "(or none, to let JAX detect SLURM / MPI / TPU pods)")
    if mode == "off" or (mode == "auto" and coordinator is None and not cluster_detected()):
        return False
    if coordinator is not None:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return True
