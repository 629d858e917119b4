"""Train every case of the DDP equivalence matrix for a few steps and write each rank's weights.

    python tests/distributed/equivalence_run.py OUT [CASE ...]                         # one process
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/distributed/equivalence_run.py OUT
Writes OUT/CASE/world{W}-rank{R}.safetensors with G.*, D.*, G_ema.* tensors.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from distgan.config import load_config  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402
from tests.distributed.support import MemorySource  # noqa: E402

NORMS = {
    "bn-g": ["generator.norm=batch", "discriminator.norm=none"],
    "syncbn-g": ["generator.norm=sync-batch", "discriminator.norm=none"],
    "syncbn-d": ["generator.norm=none", "discriminator.norm=sync-batch"],
}
PENALTIES = {
    "none": ["loss.penalty=none"],
    "r1": ["loss.penalty=r1", "loss.penalty_weight=1.0"],
    "wgan-gp": ["loss.penalty=wgan-gp", "loss.penalty_weight=1.0"],
    "lazy-r1": ["loss.penalty=r1", "loss.penalty_weight=1.0", "loss.penalty_interval=4"],
}
# WGAN-GP through a batch-norm D is refused by the config (the penalty is per sample): not a case.
CASES = {f"{p}.{n}": PENALTIES[p] + NORMS[n] for p in PENALTIES for n in NORMS if not (p == "wgan-gp" and n == "syncbn-d")}
STEPS = 20


def run_case(name: str, out: Path) -> None:
    overrides = CASES[name] + [
        f"run.dir={out / name / ('world' + os.environ.get('WORLD_SIZE', '1'))}", f"train.steps={STEPS}", "train.batch_size=12", "log.wandb=false",
        "log.sample_every=1000", "log.every=1000", "checkpoint.every=1000", "log.gif=false",
        "ema.half_life_kimg=0.05", "ema.rampup=0",
    ]
    trainer = Trainer(load_config("smoke", overrides), source=MemorySource())
    trainer.fit()
    tensors = {}
    for prefix, module in (("G", trainer.G_plain), ("D", trainer.D_plain), ("G_ema", trainer.ema.model)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().contiguous().clone()
    acc = trainer.accelerator
    save_file(tensors, str(out / name / f"world{acc.num_processes}-rank{acc.process_index}.safetensors"))
    acc.wait_for_everyone()
    return trainer


def main() -> None:
    if os.environ.get("EQ_DTYPE") == "float64":  # rounding-free comparison: differences are then logic, not noise
        torch.set_default_dtype(torch.float64)
    out = Path(sys.argv[1])
    trainer = None
    for name in sys.argv[2:] or list(CASES):
        trainer = run_case(name, out)
    trainer.close()


if __name__ == "__main__":
    main()
