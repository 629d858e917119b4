"""Training from Python in one call: the accelerator, first-use work, the parts, the Trainer, as the command does.

``python -m distgan.train`` is this function behind a command line.
"""
from __future__ import annotations

from typing import Optional

from distgan.build import build, build_accelerator, first_use
from distgan.checkpoint import TrainState
from distgan.config import Config
from distgan.data.stream import DataSource
from distgan.trainer import Trainer


def fit(cfg: Config, resume: Optional[str] = None, source: Optional[DataSource] = None) -> TrainState:
    """Train ``cfg`` to ``train.steps`` (or until a stop request) and return the counters it ended with.

    ``resume``: ``"auto"`` (the run dir's newest intact checkpoint, or a fresh start) or a checkpoint path;
    ``source``: real batches from elsewhere (any object with distgan.data.stream.DataSource's methods) instead of
    the shards at ``data.path``. Under ``accelerate launch`` every process calls it with the same arguments."""
    accelerator = build_accelerator(cfg)
    if source is None:
        first_use(cfg, accelerator)
    trainer = Trainer(cfg, resume=resume, parts=build(cfg, accelerator, source))
    try:
        return trainer.fit()
    finally:
        trainer.close()
