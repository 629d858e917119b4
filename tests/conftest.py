"""Shared fixtures: real Fashion-MNIST shards (1,000 images) prepared once per test session."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn, Optional

import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent


def run_cli(module: str, *args: str, timeout: float = 300, env: Optional[dict[str, str]] = None,
            merged: bool = False) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repo root (wandb offline, this working tree first on the import path, ``env``
    on top); fails the test with its output. ``merged``: stderr goes into stdout, in the order it was written."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=path, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} {args} failed\n{proc.stdout[-3000:]}\n{(proc.stderr or '')[-5000:]}"
    return proc


def load_bench_script(name: str) -> ModuleType:
    """bench/NAME.py imported as the module bench_NAME (registered in sys.modules: dataclasses look it up there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def in_ci() -> bool:
    """CI=1 (.ci/run exports it; most CI services set CI=true): a test that cannot run there is a failure."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cannot_run(reason: str, ci_fix: str) -> NoReturn:
    """Skip, with ``reason`` in the summary (-ra), on a developer machine; under CI fail, saying ``ci_fix``:
    a green CI run with the real-data or Slurm tests skipped would prove nothing about them."""
    if in_ci():
        pytest.fail(f"{reason}; under CI this is a failure: {ci_fix}", pytrace=False)
    pytest.skip(reason)


def require_fashion_mnist() -> None:
    """Skip on a developer machine without the Debian package; in CI its absence is a failure."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        cannot_run("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
                   ".ci/run must install the Debian package dataset-fashion-mnist (launch/setup.sh does)")


def prepare_fashion_mnist(root: Path, train: int, test: int) -> Path:
    """ROOT/fm: TRAIN Fashion-MNIST training images in shards of 500, and TEST test images beside it as
    ROOT/fm_test (where the evaluation looks for held-out images); returns ROOT/fm."""
    require_fashion_mnist()
    for split, limit, out in (("train", train, root / "fm"), ("test", test, root / "fm_test")):
        run_cli("distgan.prepare", "fashion-mnist", "--split", split, "--limit", str(limit), "--shard-size", "500",
                "--out", str(out), "--no-progress")
    return root / "fm"


@pytest.fixture(scope="session", autouse=True)
def distgan_cache(tmp_path_factory) -> Path:
    """distgan's cache folder (feature classifiers, real statistics) for this session: a temporary one, never the
    real ~/.cache; tests' subprocesses inherit it. A test wanting a cold cache sets DISTGAN_CACHE itself."""
    folder = tmp_path_factory.mktemp("distgan_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTGAN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory) -> Path:
    require_fashion_mnist()
    out = tmp_path_factory.mktemp("data") / "fashion_mnist_1k"
    run_cli("distgan.prepare", "fashion-mnist", "--out", str(out), "--limit", "1000", "--shard-size", "250")
    return out
