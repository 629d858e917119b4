"""Adaptive augmentation on 2 ranks: r_t counts both ranks' real images, so p and D stay identical."""
import json
import math
import re

import pytest

from tests.distributed.launching import REPO, launch


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_processes_share_r_t_and_p(tmp_path):
    """Each rank augments with its own draws, but r_t is summed over ranks (one all-reduce per ADA interval)."""
    proc = launch([str(REPO / "tests" / "distributed" / "augment_run.py"), str(tmp_path / "run")], processes=2,
                  timeout=240)
    # the two ranks print to one pipe, so their lines can run together: find each flat JSON object after its tag
    ranks = [json.loads(found) for found in re.findall(r"AUGMENT (\{[^{}]*\})", proc.stdout)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert ranks[0]["p"] == ranks[1]["p"] > 0 and ranks[0]["rt"] == ranks[1]["rt"]
    assert ranks[0]["d"] == ranks[1]["d"]
    # p moved by sign(r_t - 0) * 48 / 100 at steps 3 and 6: 3 D phases of the GLOBAL batch (16), speed 0.1 kimg
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    p = 0.0
    for line in lines:
        p = min(1.0, max(0.0, p + math.copysign(48 / 100, line["augment_rt"]) * (line["augment_rt"] != 0)))
        assert line["augment_p"] == pytest.approx(p, abs=1e-6), lines
