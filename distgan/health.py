"""The training step's health, recorded on the device: non-finite losses and gradients, fp16 overflows.

Read only at the sync points (log, samples, evaluation, checkpoint, end), so a step never waits for the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

# a result row of :meth:`StepHealth.read`: [skipped or overflowing phases, the current run of them, the longest run,
# the first bad step, its phase (0 D, 1 G)], -1 for none
Row = list[int]


class StepHealth:
    """Two flags per phase (loss not finite, gradients not finite) written on the device, and read with one gather
    at a sync point: the step itself never waits for the host, and a phase costs five small kernels.

    A phase whose gradients are not finite is skipped (its gradients are all-reduced, so every rank skips it). Under
    fp16 that is an overflow the loss scaler answers by lowering its scale, whatever its cause: a penalty whose
    inner backward overflowed makes the total loss non-finite too, and is skipped like any other overflow (the
    trainer stops only on too many in a row or a scale below 1). In the other precisions, and under fp16 for a
    non-finite loss whose gradients are finite, it is a real error.
    """

    def __init__(self, device: torch.device, fp16: bool) -> None:
        self.fp16 = fp16
        self.flags = torch.zeros(64, 2, dtype=torch.bool, device=device)  # one row per phase since the last read
        self.phases: list[tuple[int, int]] = []  # (step, phase) of each row, on the host
        self.run = 0  # skipped phases in a row up to the last read

    def record(self, step: int, phase: int, loss: Tensor, grad_norm: Tensor) -> Tensor:
        """Record one phase; return the device flag that skips its optimizer step."""
        row = len(self.phases)
        if row == len(self.flags):  # rare: more phases between two sync points than ever before
            self.flags = torch.cat([self.flags, torch.zeros_like(self.flags)])
        self.phases.append((step, phase))
        with torch.no_grad():
            values = torch.stack([loss, grad_norm.to(loss.dtype)])
            flags = self.flags[row]
            torch.ne(values - values, 0, out=flags)  # x - x is 0 for a finite x, NaN for inf and NaN
        return flags[1]

    def read(self, accelerator) -> list[Row]:
        """Every rank's counts (one gather, one host sync); the counts restart, the current run goes on."""
        flags = self.flags[:len(self.phases)][None]
        if accelerator.num_processes > 1:
            flags = accelerator.gather(flags)
        per_rank = flags.tolist()
        phases, run = self.phases, self.run
        self.flags = torch.zeros_like(self.flags)  # a fresh buffer: skip flags handed out stay as they were
        self.phases = []
        rows = [self._count(phases, rank_flags, run) for rank_flags in per_rank]
        self.run = rows[0][1]  # gradients are all-reduced: the same on every rank
        return rows

    def _count(self, phases: list[tuple[int, int]], flags: list[list[bool]], run: int) -> Row:
        count, longest, first = 0, run, (-1, -1)
        for (step, phase), (loss_bad, grads_bad) in zip(phases, flags):
            count += grads_bad
            run = run + 1 if grads_bad else 0
            longest = max(longest, run)
            bad = loss_bad and not grads_bad if self.fp16 else loss_bad or grads_bad
            if bad and first[0] < 0:
                first = (step, phase)
        return [count, run, longest, *first]
