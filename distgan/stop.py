"""The stop request: SIGUSR1/SIGTERM (Slurm preemption, scancel) or a ``STOP`` file in the run dir.

Training checks it at the end of a step, writes a checkpoint and exits; ``--resume auto`` continues.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import torch

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


class StopVote:
    """The OR of every rank's stop flag without a blocking copy: each check starts an all-reduce of this rank's flag and
    returns the previous check's result, which has long arrived (on CUDA it is copied to pinned host memory behind an
    event). Every rank sees the same answer at the same check, so all stop at the same step: one check after the
    first rank asked. One process: the local flag, at once."""

    def __init__(self, device: torch.device, world: int) -> None:
        self.device, self.world = device, world
        self.pending: Optional[tuple] = None  # (work, host copy, event) of the last check

    def __call__(self, local: bool) -> bool:
        if self.world == 1:
            return local
        flag = torch.full((1,), int(local), dtype=torch.int32, device=self.device)  # a fill: no host-to-device copy
        work = torch.distributed.all_reduce(flag, async_op=True)
        previous, self.pending = self.pending, (work, flag, None)
        if self.device.type == "cuda":
            work.wait()  # orders the copy after the all-reduce on the device; the host does not wait
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (work, host, event)
        return previous is not None and self._result(*previous)

    @staticmethod
    def _result(work, value: torch.Tensor, event) -> bool:
        if event is not None:
            event.synchronize()  # recorded a whole check ago: already complete
        else:
            work.wait()  # gloo: every rank started it a check ago
        return bool(value[0] > 0)
