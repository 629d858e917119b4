"""SIGINT and SIGTERM on the real commands, sent to the whole process group as a terminal, ``timeout`` and Slurm do:
training finishes the step, checkpoints and exits (130 after Ctrl-C, 0 after SIGTERM); its data worker survives the
signal; a second Ctrl-C aborts at once; sample and prepare leave nothing half-written. Every wait is on a file or a
line the command writes, with a deadline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distgan.config import GeneratorConfig
from distgan.export import export_generator
from distgan.nn import build_generator

REPO = Path(__file__).resolve().parents[1]


def start(tmp_path: Path, args: list[str], prefix: list[str] = ()) -> subprocess.Popen:
    """The command in a new session (its own process group), stdout/stderr to files in ``tmp_path``."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    return subprocess.Popen([*prefix, sys.executable, "-m", *args], stdout=out, stderr=err, env=env, cwd=REPO,
                            start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 120) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, (tmp_path / "stderr.txt").read_text()


def steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["distgan.train", "--config", "smoke", f"data.path={shards}", f"run.dir={run}", "train.steps=100000",
            "log.every=1", "log.sample_every=100000", "checkpoint.every=100000", "data.num_workers=1", *extra]


def assert_checkpointed_and_unlocked(run: Path, err: str) -> None:
    steps = sorted((run / "checkpoints").glob("step-*"))
    assert len(steps) == 1, err
    state = json.loads((steps[0] / "state.json").read_text())
    assert state["step"] == steps_logged(run) >= 1, err  # every logged step, no more
    assert "killed by signal" not in err and "Traceback" not in err, err
    assert not (run / ".lock").exists() and not (run / "STOP").exists()


@pytest.mark.timeout(240)
def test_ctrl_c_to_the_process_group_checkpoints_and_exits_130(fashion_shards, tmp_path):
    run = tmp_path / "run"
    proc = start(tmp_path, train_args(fashion_shards, run, "train.stop_check_every=1"))
    wait_for(proc, lambda: steps_logged(run) >= 1, "first metrics line")
    os.killpg(proc.pid, signal.SIGINT)  # what `kill -INT -PGID` and a terminal's Ctrl-C do
    code, err = finish(proc, tmp_path)
    assert code == 130, err
    assert_checkpointed_and_unlocked(run, err)


@pytest.mark.timeout(240)
def test_timeouts_sigterm_to_the_process_group_checkpoints_and_exits_0(fashion_shards, tmp_path):
    run = tmp_path / "run"
    # timeout signals its whole process group when it expires; SIGALRM makes it expire now
    proc = start(tmp_path, train_args(fashion_shards, run, "train.stop_check_every=1"),
                 prefix=["timeout", "--preserve-status", "-s", "TERM", "600"])
    wait_for(proc, lambda: steps_logged(run) >= 1, "first metrics line")
    os.kill(proc.pid, signal.SIGALRM)
    code, err = finish(proc, tmp_path)
    assert code == 0, err  # 0 as for Slurm's SIGTERM: slurm/train.sh tells a stop from a finish by the export
    assert_checkpointed_and_unlocked(run, err)
    assert not (run / "generator_ema.safetensors").exists()


@pytest.mark.timeout(240)
def test_a_second_ctrl_c_aborts_at_once_and_releases_the_run_dir(fashion_shards, tmp_path):
    run = tmp_path / "run"
    proc = start(tmp_path, train_args(fashion_shards, run, "train.stop_check_every=100000"))
    wait_for(proc, lambda: steps_logged(run) >= 1, "first metrics line")
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(proc, lambda: "press Ctrl-C again" in (tmp_path / "stderr.txt").read_text(), "the first SIGINT's line")
    os.killpg(proc.pid, signal.SIGINT)
    code, err = finish(proc, tmp_path, timeout=30)
    assert code == 130, err
    assert "distgan.train: interrupted: stopped at once, without a checkpoint" in err and "Traceback" not in err
    assert not list((run / "checkpoints").glob("step-*")) and not (run / ".lock").exists()


@pytest.mark.timeout(120)
def test_ctrl_c_in_sample_leaves_no_half_written_folder(tmp_path):
    cfg = GeneratorConfig(arch="mlp", z_dim=8, hidden=[16])
    torch.manual_seed(0)
    export = export_generator(tmp_path / "g.safetensors", build_generator(cfg, 8, 1), cfg, 8, 1, None, 1, ema=True)
    out = tmp_path / "out"
    proc = start(tmp_path, ["distgan.sample", "--export", str(export), "--n", "5000000", "--out", str(out)])
    # streaming: the first images are on disk (in the hidden partial folder) long before 5,000,000 are generated
    wait_for(proc, lambda: any(tmp_path.glob(".out.partial-*/out/000100.png")), "the first images")
    os.killpg(proc.pid, signal.SIGINT)
    code, err = finish(proc, tmp_path, timeout=60)
    assert code == 130 and err.strip().splitlines()[-1] == (
        "distgan.sample: interrupted by SIGINT; nothing half-written was left"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.safetensors", "stderr.txt", "stdout.txt"]


@pytest.mark.timeout(120)
def test_sigterm_in_prepare_leaves_no_half_written_shards(tmp_path):
    src = tmp_path / "src.npz"
    np.savez(src, images=np.random.default_rng(0).integers(0, 256, (300_000, 8, 8), dtype=np.uint8))
    out = tmp_path / "data"
    proc = start(tmp_path, ["distgan.prepare", "npz", "--src", str(src), "--out", str(out), "--shard-size", "1000",
                            "--no-progress"])
    wait_for(proc, lambda: any(tmp_path.glob(".data.partial-*/data/shard-000002.tar")), "the first shards")
    os.killpg(proc.pid, signal.SIGTERM)
    code, err = finish(proc, tmp_path, timeout=60)
    assert code == 143 and err.strip().splitlines()[-1] == (
        "distgan.prepare: interrupted by SIGTERM; nothing half-written was left"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz", "stderr.txt", "stdout.txt"]
