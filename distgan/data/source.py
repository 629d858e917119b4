"""Where the trainer's real batches come from: the shard stream, or any object with the same two members."""
from __future__ import annotations

from typing import Iterator, Optional, Protocol

import torch

from ..config import DataConfig
from .pipeline import make_batch_iterator, read_dataset_info


class DataSource(Protocol):
    """Real batches for the trainer: the shards, or a deterministic in-memory source in tests."""

    resolution: int
    channels: int
    classes: Optional[list[str]]

    def batches(self, batch_size: int, rank: int, world_size: int, seed: int,
                start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ShardSource:
    """The webdataset shards named by ``data.path``."""

    def __init__(self, data_cfg: DataConfig):
        self.cfg = data_cfg
        self.info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
        self.resolution, self.channels, self.classes = self.info.resolution, self.info.channels, self.info.classes

    def batches(self, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int):
        return make_batch_iterator(self.cfg, batch_size, rank, world_size, seed, start_batch)
