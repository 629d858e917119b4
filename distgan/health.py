"""The training step's health, counted on the device: non-finite losses and gradients, fp16 overflows.

Read only at the sync points (log, samples, evaluation, checkpoint, end), so a step never waits for the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


class StepHealth:
    """Non-finite losses and gradients and fp16 overflows, counted on the device every phase and read with one
    gather at a sync point: the step itself never waits for the host.

    A phase whose gradients are not finite is skipped (its gradients are all-reduced, so every rank skips
    it). Under fp16 that is an overflow the loss scaler answers by lowering its scale; a non-finite total
    loss (penalty included) is a real error in every precision. The counts: [skipped or overflowing phases,
    the current run of them, the longest run, the first bad step, its phase (0 D, 1 G)], -1 for none.
    """

    def __init__(self, device: torch.device, fp16: bool) -> None:
        self.fp16 = fp16
        self.counts = torch.tensor([0, 0, 0, -1, -1], dtype=torch.int64, device=device)

    def record(self, step: int, phase: int, loss: Tensor, grad_norm: Tensor) -> Tensor:
        """Count one phase; return the device flag that skips its optimizer step."""
        skip = ~torch.isfinite(grad_norm)
        bad = ~torch.isfinite(loss.detach())
        if not self.fp16:
            bad = bad | skip
        c = self.counts
        run = (c[1] + 1) * skip
        first = bad & (c[3] < 0)
        c.copy_(torch.stack([c[0] + skip, run, torch.maximum(c[2], run), torch.where(first, step, c[3]),
                             torch.where(first, phase, c[4])]))
        return skip

    def read(self, accelerator) -> list[list[int]]:
        """Every rank's counts (one gather, one host sync); the counters restart, the current run goes on."""
        rows = accelerator.gather(self.counts[None]) if accelerator.num_processes > 1 else self.counts[None]
        rows = rows.tolist()
        c = self.counts
        c.copy_(torch.stack([torch.zeros_like(c[0]), c[1], c[1], -torch.ones_like(c[0]), -torch.ones_like(c[0])]))
        return rows
