"""bench/gpu.py --dry-run: the GPU benchmark's own code (the Trainer and the plain loop, side by side, and the
Markdown table) runs on CPU for a few steps, so it has not rotted on the day a GPU is lent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(120)
def test_gpu_benchmark_dry_run_writes_the_table(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=110, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert "DRY RUN" in lines[0] and lines[2].startswith("| per-GPU batch | precision | compile |")
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert cells[:3] == ["8", "no", "off"]
    ours, plain, ratio = (float(c.replace(",", "")) for c in cells[3:6])
    assert ours > 0 and plain > 0 and ratio == pytest.approx(ours / plain, rel=0.1)  # figures are rounded


def test_gpu_benchmark_without_cuda_says_to_dry_run():
    proc = subprocess.run([sys.executable, "bench/gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 2 and "use --dry-run" in proc.stderr
