"""How a run shows its progress: a progress bar on a terminal, one plain line per log step
where stdout is a file (SLURM, nohup, CI), so logs stay readable and grep-able."""

from __future__ import annotations

import sys

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def plain_line(step: int, total: int, values: dict, eta_s: float) -> str:
    """step 120/600 loss 2.3456 lr 3.00e-03 tok/s 12,345 mfu 4.1% eta 3m12s"""
    return (f"step {step}/{total} loss {values['loss']:.4f} lr {values['lr']:.2e} "
            f"tok/s {values['tokens_per_sec']:,.0f} mfu {values['mfu']:.1%} eta {format_duration(eta_s)}")


class Progress:
    """The bar when `bar` (logging.progress, process 0) and stdout is a terminal; else plain lines
    from process 0 (`talk`). write() prints a message either way without breaking the bar."""

    def __init__(self, total: int, initial: int, bar: bool, talk: bool, stream=None):
        stream = stream or sys.stdout
        self.total, self.talk, self.stream = total, talk, stream
        self.use_bar = bar and talk and stream.isatty()
        self._bar = tqdm(total=total, initial=initial, disable=not self.use_bar, unit="step", dynamic_ncols=True)

    def update(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def log(self, step: int, values: dict) -> None:
        """After a log step: values has loss, lr, tokens_per_sec, mfu and step_time (seconds)."""
        if self.use_bar:
            self._bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:,.0f}",
                                  mfu=f"{values['mfu']:.0%}")
        elif self.talk:
            eta = values["step_time"] * (self.total - step)
            print(plain_line(step, self.total, values, eta), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        if self.use_bar:
            self._bar.write(message)
        elif self.talk:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        self._bar.close()
