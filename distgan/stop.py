"""Stopping cleanly on a signal.

Training (:class:`StopRequest`): SIGINT (Ctrl-C), SIGTERM (``timeout``, ``scancel``) and SIGUSR1 (Slurm's
time-limit warning), or a ``STOP`` file in the run dir, ask training to finish the step, write a checkpoint and
exit (``--resume auto`` continues); after SIGINT, ``Trainer.fit`` then raises :class:`Interrupted` (exit 130). A
second SIGINT aborts at once (KeyboardInterrupt).

Other commands (:func:`stop_cleanly`): SIGINT and SIGTERM end the command through an exception, so every
:class:`distgan.output.Output` removes its partial output, and the command exits 128 + the signal's number
with one line.

The signal reaches the whole process group from a terminal, ``timeout`` and Slurm: data workers ignore it
(distgan.data.stream) and the main process decides.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

STOP_FILE = "STOP"
log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) raised where the command stands, so partial outputs are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class StopRequest:
    """Set by a signal or by a ``STOP`` file in the run dir: checkpoint at the end of the step and exit.

    A second SIGINT raises KeyboardInterrupt at once: the user does not want to wait for the checkpoint."""

    def __init__(self, run_dir: Path,
                 signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.file = run_dir / STOP_FILE
        self.signalled: Optional[str] = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.signalled == name:
            raise KeyboardInterrupt("a second SIGINT")
        if self.signalled != "SIGINT":  # SIGINT's exit status wins over a SIGTERM a launcher forwards after it
            self.signalled = name
        if signum == signal.SIGINT:
            log.warning("SIGINT: training stops after this step and writes a checkpoint; press Ctrl-C again to "
                        "abort at once, without one")

    def local(self) -> bool:
        return self.signalled is not None or self.file.exists()

    def reason(self) -> str:
        return f"signal {self.signalled}" if self.signalled else f"file {self.file}"

    def interrupted(self) -> bool:
        """Stopped by Ctrl-C: the caller gets :class:`Interrupted` once the checkpoint is written (exit 130). SIGTERM
        and SIGUSR1 are preemption, which slurm/train.sh requeues on exit status 0."""
        return self.signalled == "SIGINT"

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


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


def stop_cleanly(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body with SIGINT and SIGTERM raised as :class:`Interrupted`; on one, say so in a line and
    return 128 + its number (the outputs' own handlers have removed what was half written)."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread: the signals keep their handlers
            pass
    try:
        return body()
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(f"{prog}: interrupted by {signal.Signals(signum).name}; nothing half-written was left",
              file=sys.stderr)
        return exit_status(signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
