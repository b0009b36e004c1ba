"""train.profile_steps: a jax.profiler trace of chosen steps only, so the trace shows the steady
state of the train step and not compilation or start-up."""

from __future__ import annotations

import pathlib

import jax


class StepProfiler:
    """start(step) before running step `step` (1-based), stop(step, result) after it: the trace
    covers steps first..last of `steps` (a (first, last) pair, or None for off)."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: pathlib.Path, talk):
        self.steps, self.directory, self.talk = steps, run_dir / "profile", talk
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, result) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(result)  # the trace must hold the device work of its last step
            self._stop(step)

    def close(self, step: int) -> None:
        """Ends a trace the run left early (a stop signal, an error)."""
        if self.active:
            self._stop(step)

    def _stop(self, step: int) -> None:
        jax.profiler.stop_trace()
        self.active = False
        self.talk(f"profile of steps {self.steps[0]}-{step} written to {self.directory} "
                  f"(tensorboard --logdir {self.directory.parent}, Profile tab; or ui.perfetto.dev)")
