"""slurm/train.sh with the real trainer on the local 2-node cluster: a whole run, preemption and requeue,
scancel (SIGTERM), and a training process killed mid-run.

Every job is ``CONFIG=smoke sbatch --nodes=2 --cpus-per-task=1 slurm/train.sh`` on 1,000 real Fashion-MNIST
images, submitted from a fresh folder (``python -m distgan.train`` is the installed package). The tests
read what the run wrote: the job log, metrics.jsonl (``log.every=1``: one line per step) and the checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.export import load_generator_export

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"
GLOBAL_BATCH = 16  # configs/smoke.yaml: train.batch_size
RANK_LINE = re.compile(r"rank (\d+)/(\d+) on host \S+ \(node (\d+)\), device (\w+)\S*, (\d+) threads")


@dataclass
class Job:
    id: int
    log: Path
    run_dir: Path

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def submit(cluster, folder: Path, shards: Path, steps: int, *overrides: str, run_dir: str | None = None) -> Job:
    """Submit train.sh on 2 nodes x 1 CPU process from ``folder``, training ``steps`` steps on ``shards``
    (in ``run_dir``, given as the override run.dir=..., or else in train.sh's default run folder)."""
    (folder / "logs").mkdir(exist_ok=True)
    args = [f"data.path={shards}", f"train.steps={steps}", *overrides, *([f"run.dir={run_dir}"] if run_dir else [])]
    # this working tree's distgan, not whichever one is installed
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    job = cluster.sbatch(TRAIN_SH, "--nodes=2", "--cpus-per-task=1", env={"CONFIG": "smoke", "PYTHONPATH": path},
                         cwd=folder, script_args=args)
    return Job(job, folder / "logs" / f"distgan-{job}.out", folder / (run_dir or f"runs/distgan-{job}"))


def metrics(job: Job) -> list[dict]:
    """The lines of metrics.jsonl written so far (a line being written, without its newline yet, is left out)."""
    path = job.run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def wait_for_steps(cluster, job: Job, steps: int, timeout: float = 60) -> None:
    """Wait until both ranks are training: ``steps`` lines in metrics.jsonl (each step is a collective)."""
    deadline = time.monotonic() + timeout
    while len(metrics(job)) < steps:
        assert time.monotonic() < deadline, f"no training after {timeout} s:\n{job.text()}\n{cluster.logs()}"
        assert cluster.job_state(job.id) in ("PENDING", "RUNNING"), job.text()
        time.sleep(0.1)


def checkpoint_states(job: Job) -> dict[int, dict]:
    """Step -> state.json of each complete checkpoint in the run dir."""
    states = [json.loads(p.read_text()) for p in (job.run_dir / "checkpoints").glob("step-*/state.json")]
    return {s["step"]: s for s in states}


def assert_ended_cleanly(cluster, job: Job, submit_dir: Path) -> None:
    """One run dir, no STOP file left, and no process of the job left on any node."""
    assert sorted((submit_dir / "runs").iterdir()) == [job.run_dir]
    assert not (job.run_dir / "STOP").exists()
    assert cluster.wait_job_gone(job.id, timeout=20) == []


@pytest.mark.timeout(150)
def test_two_node_run_completes_with_every_file_in_one_run_dir(slurm_cluster, fashion_shards, tmp_path):
    steps = 20  # smoke: checkpoints and samples every 10, metrics every 5
    job = submit(slurm_cluster, tmp_path, fashion_shards, steps)
    state = slurm_cluster.wait(job.id, timeout=120)
    log = job.text()
    assert state == "COMPLETED", log
    info = slurm_cluster.job_info(job.id)
    assert (info["ExitCode"], info["Restarts"], info["NodeList"]) == ("0:0", "0", "n[1-2]"), info

    # rank, world size, node id, device, threads: one process on each node, one thread each (--cpus-per-task=1);
    # which node gets rank 0 is the c10d rendezvous's choice
    ranks = RANK_LINE.findall(log)
    assert sorted(r[0] for r in ranks) == ["0", "1"] and sorted(r[2] for r in ranks) == ["0", "1"], log
    assert {r[1:2] + r[3:] for r in ranks} == {("2", "cpu", "1")}, log
    assert f"done: {steps} steps, {steps * GLOBAL_BATCH} images" in log
    assert "training finished" in log and "requeue" not in log

    run = job.run_dir
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000010", "step-00000020"]
    final = checkpoint_states(job)[steps]
    assert (final["world_size"], final["images_seen"], final["batches_consumed"]) == (2, steps * GLOBAL_BATCH, steps)
    assert [m["step"] for m in metrics(job)] == [5, 10, 15, 20]
    assert {p.name for p in (run / "samples").iterdir()} >= {"g_ema-step-00000010.png", "g_ema-step-00000020.png"}
    assert (run / "progress.gif").stat().st_size > 0
    assert f"path: {fashion_shards}" in (run / "config.yaml").read_text()
    generator, meta = load_generator_export(run / "generator_ema.safetensors")
    assert (meta["step"], meta["resolution"], meta["channels"]) == (steps, 28, 1)
    assert sum(p.numel() for p in generator.parameters()) > 0
    assert_ended_cleanly(slurm_cluster, job, tmp_path)


@pytest.mark.timeout(200)
def test_usr1_checkpoints_requeues_and_resumes_without_losing_a_step(slurm_cluster, fashion_shards, tmp_path):
    steps = 150
    # run.dir given as an override: train.sh must put STOP (its only way to reach training on USR1) there
    job = submit(slurm_cluster, tmp_path, fashion_shards, steps, "log.every=1", "log.sample_every=50",
                 "checkpoint.every=50", run_dir="runs/by-override")
    wait_for_steps(slurm_cluster, job, 3)
    slurm_cluster.signal_job(job.id, "USR1")  # what --signal=B:USR1@120 does before the time limit

    state = slurm_cluster.wait(job.id, timeout=130)
    log = job.text()
    assert state == "COMPLETED", log
    assert slurm_cluster.job_info(job.id)["Restarts"] == "1", log
    assert "got SIGUSR1" in log and f"requeueing job {job.id}" in log
    stopped = [int(n) for n in re.findall(r"stopped at step (\d+) on request", log)]
    assert len(stopped) == 1 and 3 <= stopped[0] < steps, log
    n = stopped[0]
    # both ranks of the requeued job resumed from the checkpoint written on the stop, in the same run dir
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(job.run_dir / "checkpoints" / f"step-{n:08d}"), str(n))] * 2, log
    assert log.count(f"run dir {job.run_dir}") >= 2  # train.sh's start line, before and after the requeue

    # one metrics line per step, each exactly once: nothing lost, the counter never went back
    lines = metrics(job)
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert [m["images_seen"] for m in lines] == [s * GLOBAL_BATCH for s in range(1, steps + 1)]
    final = checkpoint_states(job)[steps]  # the data stream continued where it stopped: one batch per step
    assert (final["images_seen"], final["batches_consumed"], final["world_size"]) == (steps * GLOBAL_BATCH, steps, 2)
    assert f"done: {steps} steps" in log and (job.run_dir / "generator_ema.safetensors").is_file()
    assert_ended_cleanly(slurm_cluster, job, tmp_path)


@pytest.mark.timeout(150)
def test_scancel_checkpoints_and_ends_without_requeue(slurm_cluster, fashion_shards, tmp_path):
    steps = 5000  # never reached: the job is cancelled
    # a data worker per rank: scancel's SIGTERM reaches it too, and it must not take training down with it
    job = submit(slurm_cluster, tmp_path, fashion_shards, steps, "log.every=1", "log.sample_every=1000",
                 "data.num_workers=1")
    wait_for_steps(slurm_cluster, job, 3)
    slurm_cluster.run("scancel", str(job.id))  # TERM to the batch shell and the job step, as at the time limit

    state = slurm_cluster.wait(job.id, timeout=60)
    log = job.text()
    assert state == "CANCELLED", log
    assert slurm_cluster.job_info(job.id)["Restarts"] == "0", log
    stopped = [int(n) for n in re.findall(r"stopped at step (\d+) on request \(signal SIGTERM\)", log)]
    assert len(stopped) == 1 and stopped[0] >= 3, log
    n = stopped[0]
    assert checkpoint_states(job)[n]["images_seen"] == n * GLOBAL_BATCH
    assert [m["step"] for m in metrics(job)] == list(range(1, n + 1))  # every step up to the checkpoint, no more
    assert "got SIGTERM" in log and "requeueing" not in log and "killed by signal" not in log
    assert "stopped by SIGTERM" in log and f"last checkpoint {job.run_dir}/checkpoints/step-{n:08d}" in log
    assert not (job.run_dir / "generator_ema.safetensors").exists()
    assert_ended_cleanly(slurm_cluster, job, tmp_path)


@pytest.mark.timeout(150)
def test_killed_rank_fails_the_job_quickly_without_requeue(slurm_cluster, fashion_shards, tmp_path):
    job = submit(slurm_cluster, tmp_path, fashion_shards, 5000, "log.every=1", "log.sample_every=1000")
    wait_for_steps(slurm_cluster, job, 3)
    on_n2 = slurm_cluster.job_pids(job.id, node="n2", env={"LOCAL_RANK": "0"})
    assert len(on_n2) == 1, f"the training process on n2: {on_n2}"
    os.kill(on_n2[0], signal.SIGKILL)  # the process dies, the node stays up
    killed = time.monotonic()

    state = slurm_cluster.wait(job.id, timeout=90)
    took = time.monotonic() - killed
    log = job.text()
    assert state == "FAILED", log
    assert took < 60, f"the job took {took:.0f} s to end after rank 1 died"
    info = slurm_cluster.job_info(job.id)
    assert info["Restarts"] == "0" and info["ExitCode"] != "0:0", info
    assert "srun: error: n2: task 1: Exited with exit code" in log, log
    assert "Signal 9 (SIGKILL) received by PID" in log  # the launcher on n2 names the dead rank
    # srun's status is the highest of its tasks': 1 when rank 0 noticed the dead peer and exited first, 143 when
    # --kill-on-bad-exit's SIGTERM reached rank 0's launcher first (the usual order on a loaded machine)
    failed = re.search(r"training FAILED \(srun exit status (\d+)\)", log)
    assert failed and failed.group(1) in ("1", "143") and "Not requeued" in log, log
    assert "requeueing" not in log and "got SIG" not in log
    assert_ended_cleanly(slurm_cluster, job, tmp_path)


@pytest.mark.timeout(150)
def test_stop_asked_for_while_training_starts_is_not_lost(slurm_cluster, fashion_shards, tmp_path):
    """The trainer deletes a STOP file it finds at start-up (a stale one, to it); train.sh keeps the request."""
    job = submit(slurm_cluster, tmp_path, fashion_shards, 5000, "log.every=1", "log.sample_every=1000")
    deadline = time.monotonic() + 60
    while "train.sh" not in job.text():
        assert time.monotonic() < deadline and slurm_cluster.job_state(job.id) in ("PENDING", "RUNNING"), job.text()
        time.sleep(0.05)
    slurm_cluster.signal_job(job.id, "TERM")  # to the batch shell only, as some preemption set-ups do
    assert not RANK_LINE.search(job.text()), "the trainer had started: too late to test its start-up"

    state = slurm_cluster.wait(job.id, timeout=60)
    log = job.text()
    assert state == "COMPLETED", log  # training stopped on request and exited 0
    assert slurm_cluster.job_info(job.id)["Restarts"] == "0", log
    stopped = [int(n) for n in re.findall(r"stopped at step (\d+) on request", log)]
    assert len(stopped) == 1 and 1 <= stopped[0] < 5000, log
    n = stopped[0]
    assert [m["step"] for m in metrics(job)] == list(range(1, n + 1))
    assert checkpoint_states(job)[n]["images_seen"] == n * GLOBAL_BATCH
    assert f"training stopped on request (SIGTERM) at checkpoint {job.run_dir}/checkpoints/step-{n:08d}" in log
    assert "requeueing" not in log and not (job.run_dir / "generator_ema.safetensors").exists()
    assert_ended_cleanly(slurm_cluster, job, tmp_path)


@pytest.mark.timeout(240)
def test_a_dead_node_requeues_the_job_which_resumes_from_its_last_checkpoint(slurm_cluster, fashion_shards, tmp_path):
    """n2's slurmd and every job process on it are SIGKILLed (a node failure). Slurm declares n2 DOWN, requeues
    the job (--requeue), which starts again on n1 and n3 and resumes from the last periodic checkpoint."""
    steps = 100  # far more than run before the kill lands (about 20 steps/s once started)
    overrides = ("log.every=1", "log.sample_every=1000", "checkpoint.every=5")
    (tmp_path / "straight").mkdir()
    straight = submit(slurm_cluster, tmp_path / "straight", fashion_shards, steps, *overrides)
    assert slurm_cluster.wait(straight.id, timeout=200, states=("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED"
    job = submit(slurm_cluster, tmp_path, fashion_shards, steps, *overrides)
    wait_for_steps(slurm_cluster, job, 7)  # past the first checkpoint, step 5
    slurm_cluster.stop_node("n2")
    try:
        state = slurm_cluster.wait(job.id, timeout=200, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    finally:
        slurm_cluster.start_node("n2")  # back for the next tests; the job no longer runs there
    log = job.text()
    assert state == "COMPLETED", log
    info = slurm_cluster.job_info(job.id)
    assert (info["Restarts"], info["NodeList"]) == ("1", "n[1,3]"), info
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert len(resumed) == 2 and resumed[0] == resumed[1], log  # both ranks, from the same checkpoint
    n = int(resumed[0][1])
    assert 5 <= n < steps and n % 5 == 0 and resumed[0][0] == str(job.run_dir / "checkpoints" / f"step-{n:08d}"), log
    first = log[:log.index("(restart 1)")]  # what train.sh said as the node died: not "failed", not "not requeued"
    assert "a node of this job failed (n2: down" in first and "not requeued" not in first.lower(), log
    final = checkpoint_states(job)[steps]  # the data stream continued from the checkpoint: one batch per step
    assert (final["images_seen"], final["batches_consumed"], final["world_size"]) == (steps * GLOBAL_BATCH, steps, 2)
    assert {m["step"] for m in metrics(job)} == set(range(1, steps + 1))
    _, meta = load_generator_export(job.run_dir / "generator_ema.safetensors")
    assert meta["step"] == steps
    # the same G_ema, bit for bit, as the job that no node failure interrupted
    ours, theirs = (load_file(str(j.run_dir / "generator_ema.safetensors")) for j in (job, straight))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "training finished" in log
    assert_ended_cleanly(slurm_cluster, job, tmp_path)
    slurm_cluster.wait_nodes_idle(60)
