"""Shared fixtures: real Fashion-MNIST shards (1,000 images) prepared once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repo root (wandb offline); fails the test with its output."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} {args} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def require_fashion_mnist() -> None:
    """Skip on a developer machine without the Debian package; in CI its absence is a failure."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI"):
            pytest.fail("Fashion-MNIST is missing: .ci/run must install the Debian package dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory) -> Path:
    require_fashion_mnist()
    out = tmp_path_factory.mktemp("data") / "fashion_mnist_1k"
    run_cli("distgan.prepare", "fashion-mnist", "--out", str(out), "--limit", "1000", "--shard-size", "250")
    return out
