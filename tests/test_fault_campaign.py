"""A fault campaign: SIGKILL the trainer at random instants (a checkpoint every step, so many kills land inside a
save), resume with --resume auto each time, and end with G_ema bit-identical to an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parent.parent
KILLS = 10
STEPS = 60


def _command(shards: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "distgan.train", "--config", "smoke", "--resume", "auto", f"data.path={shards}",
            f"run.dir={run}", f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=2", "data.num_workers=0",
            "log.every=1", "log.sample_every=1000", "log.gif=false", "train.cpu_threads=1"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))


def _latest_step(run: Path) -> int:
    found = list_checkpoints(run / "checkpoints")
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_at_random_instants_then_resume_gives_the_uninterrupted_result(fashion_shards, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(fashion_shards, straight), cwd=REPO, env=_env(), check=True, capture_output=True,
                   timeout=300)

    run, rng, kills = tmp_path / "killed", random.Random(0), 0
    while kills < KILLS:
        before = _latest_step(run)
        proc = subprocess.Popen(_command(fashion_shards, run), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _latest_step(run) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # wait for this launch to make progress, then kill it at a random instant
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            pytest.fail(f"training finished after {kills} kills: raise STEPS")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
    assert _latest_step(run) < STEPS
    done = subprocess.run(_command(fashion_shards, run), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    for name in ("generator_ema.safetensors", f"checkpoints/step-{STEPS:08d}/D.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
