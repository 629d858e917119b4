"""2 ranks: the export fails on the main process while the last evaluation is a collective of every rank
(tests/distributed/test_end_failure.py). Prints each rank's error and exits 3."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from distgan.config import ConfigError, load_config  # noqa: E402
from distgan.errors import UserError  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402
from tests.distributed.support import MemorySource  # noqa: E402


def main() -> None:
    cfg = load_config("smoke", [f"run.dir={sys.argv[1]}", "train.steps=2", "log.every=1", "log.sample_every=1000",
                                "log.gif=false", "train.cpu_threads=1", "ema.enabled=false",
                                "train.collective_timeout_s=300"])
    trainer = Trainer(cfg, source=MemorySource())
    trainer.evaluator = object()  # as with eval.metrics: the last step is evaluated in _finish, by every rank
    trainer.evaluate = lambda step: dist.all_reduce(torch.ones(1)) or {}  # a collective, as the Evaluator's gathers
    rank = trainer.accelerator.process_index
    if rank == 0:
        def fail() -> None:
            raise ConfigError("the export failed")

        trainer._export = fail
    try:
        trainer.fit()
    except UserError as err:
        print(f"rank {rank} ended with: {err}", flush=True)
        sys.exit(3)
    print(f"rank {rank} ended without an error", flush=True)


if __name__ == "__main__":
    main()
