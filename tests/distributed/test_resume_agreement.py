"""``--resume auto`` is decided once, on rank 0, and every rank follows it."""
import json
from pathlib import Path

import pytest

from distgan.config import load_config
from distgan.trainer import Trainer
from tests.distributed.launching import REPO, launch
from tests.distributed.support import MemorySource


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = load_config("smoke", [f"run.dir={run}", "train.steps=2", "log.sample_every=1000", "log.gif=false",
                                "log.every=1"])
    Trainer(cfg, source=MemorySource()).fit()
    launch([str(REPO / "tests" / "distributed" / "resume_agreement_run.py"), str(run), "3"], processes=2,
           timeout=240)
    resumed = [json.loads(Path(f"{run}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in resumed) == [0, 1]
    assert {r["from"] for r in resumed} == {str(run / "checkpoints" / "step-00000002")}
    assert {r["step"] for r in resumed} == {3}
