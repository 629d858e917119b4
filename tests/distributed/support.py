"""A deterministic in-memory data source: global batch i is a pure function of i; each rank takes its slice.

It feeds one process and N processes the same global batches, so their training can be compared number
for number (the shard pipeline is tested separately for equal step counts and disjoint streams).
"""
from __future__ import annotations

import torch


class MemorySource:
    def __init__(self, resolution: int = 28, channels: int = 1, seed: int = 1234, num_classes: int = 0):
        """``num_classes``: labeled (the label is the image's brightness bucket), else unlabeled (-1)."""
        self.resolution, self.channels = resolution, channels
        self.classes = [f"bright{k}" for k in range(num_classes)] if num_classes else None
        self.seed = seed

    def global_batch(self, index: int, global_batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + index)
        base = torch.rand(global_batch, self.channels, 1, 1, generator=g)  # per-image brightness: a learnable signal
        noise = torch.rand(global_batch, self.channels, self.resolution, self.resolution, generator=g)
        return (0.7 * base + 0.3 * noise) * 2 - 1

    def batches(self, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int):
        index = start_batch
        while True:
            x = self.global_batch(index, batch_size * world_size)[rank * batch_size:(rank + 1) * batch_size]
            if self.classes:
                brightness = (x.mean(dim=(1, 2, 3)) + 1) / 2
                yield x, (brightness * len(self.classes)).long().clamp(0, len(self.classes) - 1)
            else:
                yield x, torch.full((batch_size,), -1, dtype=torch.long)
            index += 1
