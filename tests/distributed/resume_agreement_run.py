"""Resume a run on every rank, rank 1 seeing a stale view of the shared run dir; write what each resumed from
(RUN.rankR.json). No ACCELERATE_USE_CPU: distgan asks Accelerate for the CPU itself when CUDA is absent.

    accelerate launch --config_file launch/cpu-2proc.yaml tests/distributed/resume_agreement_run.py RUN STEPS

On rank 1, checkpoint discovery answers with a path that does not exist (as on a shared filesystem right after a
requeue, when ranks can list different "latest" checkpoints): the ranks must still agree on rank 0's answer.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distgan import rundir  # noqa: E402
from distgan import trainer as trainer_module  # noqa: E402
from distgan.config import load_config  # noqa: E402
from tests.distributed.support import MemorySource  # noqa: E402

run_dir, steps = sys.argv[1], int(sys.argv[2])
if os.environ.get("RANK") == "1":
    rundir.find_resume_path = lambda resume, run: Path(run) / "checkpoints" / "step-99999999"
cfg = load_config("smoke", [f"run.dir={run_dir}", f"train.steps={steps}", "log.every=1", "log.sample_every=1000",
                            "log.gif=false"])
trainer = trainer_module.Trainer(cfg, source=MemorySource(), resume="auto")
trainer.fit()
answer = {"rank": trainer.rank, "from": str(trainer.resumed_from), "step": trainer.state.step}
Path(f"{run_dir}.rank{trainer.rank}.json").write_text(json.dumps(answer))  # one file per rank: stdout interleaves
trainer.close()
