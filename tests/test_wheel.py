"""distgan as a user installs it: the wheel built offline, installed into a fresh venv, run from an empty folder.

The venv sees this machine's torch and the other dependencies (--system-site-packages, the wheel with --no-deps);
nothing of this checkout is on the import path, so the configs must come from the wheel itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """CMD from CWD with no PYTHONPATH (only the venv's own packages and the system's); fails with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ACCELERATE_MIXED_PRECISION")}
    env.update(WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources (a build in the checkout would leave build/ behind), with no network."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("distgan", "configs"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist",
         src], cwd=tmp, timeout=180)
    (wheel,) = (tmp / "dist").glob("distgan-*.whl")
    return wheel


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A fresh venv's python with only the wheel installed in it (this interpreter's packages visible)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "distgan").rglob("*.py")}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"
    configs = {f"distgan/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert "distgan/configs/smoke.yaml" in configs and configs <= names
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # this interpreter's pip, run by the venv's python, installs into the venv; --ignore-installed: a distgan
    # installed beside torch (an editable checkout) is left alone and shadowed
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp)
    return python


def test_the_installed_wheel_trains_the_smoke_config_by_name_and_samples_it(venv_python, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    venv = venv_python.parent.parent
    found = run([venv_python, "-c", "import distgan.config as c; print(c.__file__); print(c.CONFIG_DIR)"], cwd=work)
    module_file, config_dir = (Path(line) for line in found.stdout.split())
    assert venv in module_file.parents and config_dir == module_file.parent / "configs", found.stdout
    assert REPO not in module_file.parents

    rng = np.random.default_rng(0)  # plumbing only: 64 random 28x28 grey images with 10 labels
    np.savez(tmp_path / "images.npz", images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 10, 64))
    run([venv_python, "-m", "distgan.prepare", "npz", "--src", tmp_path / "images.npz", "--out", "data",
         "--shard-size", "32", "--no-progress"], cwd=work)
    run([venv_python, "-m", "distgan.train", "--config", "smoke", "data.path=data", "run.dir=runs/smoke",
         "train.steps=4", "log.every=2", "log.sample_every=2", "checkpoint.every=2"], cwd=work, timeout=180)
    assert (work / "runs/smoke/generator_ema.safetensors").is_file()
    assert "train:\n  steps: 4\n  batch_size: 16" in (work / "runs/smoke/config.yaml").read_text()  # smoke's batch
    run([venv_python, "-m", "distgan.sample", "--run", "runs/smoke", "--n", "4", "--out", "samples"], cwd=work)
    assert len(list((work / "samples").glob("*.png"))) == 4

    # the command line's configs are the wheel's: a missing name lists the installed folder and its names
    missing = subprocess.run([venv_python, "-m", "distgan.train", "--config", "nope"], cwd=work, capture_output=True,
                             text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert missing.returncode == 2 and f"configs in {config_dir} (available: " in missing.stderr
    assert "fashion_mnist.yaml" in missing.stderr and "smoke.yaml" in missing.stderr
