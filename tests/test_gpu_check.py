"""bench/gpu_check.sh --dry-run: every step of the GPU check runs on the CPU with tiny sizes and lands in the report."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from compare import assert_same_text

REPO = Path(__file__).resolve().parents[1]


def run_check(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=280)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_dry_run_runs_every_step(tmp_path):
    done = run_check(tmp_path / "check")
    report = (tmp_path / "check" / "report.md").read_text()
    assert done.returncode == 0, report + done.stdout + done.stderr
    assert "FAILED" not in report
    for heading in ("## Environment", "## Synthetic CIFAR-shaped shards", "## Loader speed", "## Host syncs inside a step",
                    "## Throughput: distgan against a plain loop", "## End to end: resume to twice the steps"):
        assert heading in report
    assert "| no | 3 steps, no host sync" in report and "| fp16 + r1 | skipped: needs a GPU |" in report
    assert "| 8 | no | off |" in report  # bench/gpu.py's table row
    assert "resumed run reached step 4" in report


def test_a_folder_it_did_not_write_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    done = run_check(tmp_path)
    assert done.returncode == 2 and "did not write" in done.stderr
    assert_same_text((tmp_path / "mine.txt").read_text(), "keep", "the user's file")
