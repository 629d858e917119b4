"""The real command through the real launcher: 2 gloo processes on CPU, resume across process counts,
refused launches, and a dead rank ending the job in bounded time."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.launching import REPO, cpu_env, free_port, launch

pytestmark = [pytest.mark.distributed]


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["distgan.train", "--config", "smoke", f"data.path={shards}", f"run.dir={run}", *extra]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_two_processes_train_the_real_command(fashion_shards, tmp_path):
    run = tmp_path / "run"
    proc = launch(train_args(fashion_shards, run, "data.num_workers=2"), processes=2, timeout=240, module=True)
    log = proc.stdout + proc.stderr
    assert "rank 0/2" in log and "rank 1/2" in log
    threads = [int(t) for t in re.findall(r"rank \d/2 .* (\d+) threads", log)]
    assert len(threads) == 2 and sum(threads) <= max(2, len(os.sched_getaffinity(0)))
    assert steps_logged(run) == [5, 10, 15, 20]
    assert (run / "generator_ema.safetensors").is_file() and (run / "progress.gif").is_file()
    assert "per-rank batch 8" in log  # global batch 16 over 2 processes


@pytest.mark.timeout(300)
def test_one_shard_two_ranks_two_workers_runs_equal_steps(tmp_path):
    """Fewer shards than ranks x workers: every rank still runs every step (a hang would time out)."""
    import numpy as np

    from distgan.data.shards import write_shards

    images = np.random.default_rng(0).integers(0, 255, size=(50, 28, 28), dtype=np.uint8)
    write_shards(images, None, tmp_path / "one", shard_size=1000, progress=False)
    run = tmp_path / "run"
    launch(train_args(tmp_path / "one", run, "data.num_workers=2", "train.steps=12", "checkpoint.every=6"),
           processes=2, timeout=240, module=True)
    assert steps_logged(run) == [5, 10, 12]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_across_process_counts(fashion_shards, tmp_path, first, second):
    run = tmp_path / "run"
    launch(train_args(fashion_shards, run, "train.steps=10"), processes=first, timeout=200, module=True)
    assert (run / "checkpoints" / "step-00000010").is_dir()
    proc = launch(train_args(fashion_shards, run, "train.steps=20") + ["--resume", "auto"], processes=second,
                  timeout=200, module=True)
    assert "resumed from" in proc.stdout + proc.stderr
    assert f"resuming a {first}-process checkpoint on {second} processes" in proc.stdout + proc.stderr
    assert steps_logged(run) == [5, 10, 15, 20]  # the counter continues; never goes back
    state = json.loads((run / "checkpoints" / "step-00000020" / "state.json").read_text())
    assert state["step"] == 20 and state["images_seen"] == 20 * 16 and state["world_size"] == second


@pytest.mark.timeout(120)
def test_silent_replicas_are_refused(fashion_shards, tmp_path):
    """torchrun with a plain Accelerator on a CPU machine would give 2 independent replicas: refused."""
    env = cpu_env()
    env.pop("ACCELERATE_USE_CPU")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m"] + train_args(fashion_shards, tmp_path / "run")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "independent replica" in proc.stderr and "ACCELERATE_USE_CPU=1" in proc.stderr


@pytest.mark.timeout(120)
def test_batch_that_does_not_divide_names_both(fashion_shards, tmp_path):
    with pytest.raises(AssertionError, match=r"train.batch_size=15 does not divide over 2 processes"):
        launch(train_args(fashion_shards, tmp_path / "run", "train.batch_size=15"), processes=2, timeout=100,
               module=True)


@pytest.mark.timeout(60)
def test_mixed_precision_on_cpu_is_a_clear_error(tmp_path):
    for precision in ("fp16", "bf16"):
        proc = subprocess.run([sys.executable, "-m", "distgan.train", "--config", "smoke", f"run.dir={tmp_path}",
                               f"train.mixed_precision={precision}"], cwd=REPO, env=cpu_env(), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "needs a GPU" in proc.stderr and precision in proc.stderr


@pytest.mark.timeout(240)
def test_a_killed_rank_ends_the_job_in_bounded_time(fashion_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m"] + train_args(
        fashion_shards, run, "train.steps=100000", "log.every=1", "checkpoint.every=100000", "train.collective_timeout_s=30")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "distgan.train" in " ".join(p.cmdline())]
        rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
        assert rank1, [p.cmdline() for p in workers]
        killed_at = time.time()
        rank1[0].send_signal(signal.SIGKILL)
        out, _ = launcher.communicate(timeout=90)
        elapsed = time.time() - killed_at
        assert launcher.returncode != 0, out[-3000:]
        assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank died"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
