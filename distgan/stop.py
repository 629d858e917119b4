"""The stop request: SIGUSR1/SIGTERM (Slurm preemption, scancel) or a ``STOP`` file in the run dir.

Training checks it at the end of a step, writes a checkpoint and exits; ``--resume auto`` continues.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

STOP_FILE = "STOP"


class StopRequest:
    """Set by SIGUSR1/SIGTERM or by a ``STOP`` file in the run dir: checkpoint at the end of the step and exit."""

    def __init__(self, run_dir: Path, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.file = run_dir / STOP_FILE
        self.signalled: Optional[str] = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def local(self) -> bool:
        return self.signalled is not None or self.file.exists()

    def reason(self) -> str:
        return f"signal {self.signalled}" if self.signalled else f"file {self.file}"

    def clear(self) -> None:
        self.file.unlink(missing_ok=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
