"""Train with adaptive augmentation on every rank; print each rank's p, r_t and a checksum of D's weights.

    accelerate launch --config_file launch/cpu-2proc.yaml tests/distributed/augment_run.py RUN
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distgan.config import load_config  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402
from tests.distributed.support import MemorySource  # noqa: E402

cfg = load_config("smoke", [f"run.dir={sys.argv[1]}", "train.steps=6", "log.every=3", "log.sample_every=1000",
                            "log.gif=false", "augment.policy=[translation,cutout,color]", "augment.p=0",
                            "augment.adaptive=true", "augment.interval=3", "augment.speed_kimg=0.1",
                            "augment.target=0"])
trainer = Trainer(cfg, source=MemorySource())
trainer.fit()
D = trainer.D_plain
checksum = sum(p.double().abs().sum().item() for p in D.parameters())
print("AUGMENT " + json.dumps({"rank": trainer.rank, "p": D.p.item(), "rt": D.rt.item(), "d": checksum}))
trainer.close()
