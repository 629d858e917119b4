"""The real command through the real launcher: 2 gloo processes on CPU, resume across process counts,
refused launches, threads per process, and a dead or hung rank ending the job in bounded time."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distgan.config import ConfigError, load_config
from distgan.distributed import available_cores, threads_per_process
from tests.distributed.launching import (LAUNCH_CONFIGS, REPO, cpu_env, free_port, kill_launched, launch,
                                        launch_command, start)

pytestmark = [pytest.mark.distributed]


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    return ["distgan.train", "--config", "smoke", f"data.path={shards}", f"run.dir={run}", *extra]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def threads_logged(log: str, world: int) -> list[int]:
    """The thread count each rank logged at start-up ("rank R/W ... N threads ..."), in rank order."""
    found = sorted((int(r), int(n)) for r, n in re.findall(rf"rank (\d+)/{world} .*?, (\d+) threads", log))
    assert [r for r, _ in found] == list(range(world)), log[-3000:]
    return [n for _, n in found]


def test_the_launch_lines_are_the_readmes():
    """launching.py runs these files; the README must tell users the same lines, or the tests prove another command."""
    readme = (REPO / "README.md").read_text()
    assert f"accelerate launch --config_file {LAUNCH_CONFIGS[1]} -m distgan.train" in readme
    assert f"\n    accelerate launch --config_file {LAUNCH_CONFIGS[2]} -m distgan.train" in readme
    assert all((REPO / path).is_file() for path in LAUNCH_CONFIGS.values())


def test_threads_per_process_shares_the_cores():
    assert threads_per_process(cores=2, local_processes=2) == 1
    assert threads_per_process(cores=2, local_processes=1) == 2
    assert threads_per_process(cores=16, local_processes=3) == 5  # never more threads than cores
    assert threads_per_process(cores=2, local_processes=4) == 1  # at least one
    assert threads_per_process(cores=2, local_processes=2, requested=3) == 3  # train.cpu_threads wins



def test_a_slurm_allocation_bounds_the_cores():
    """Under Slurm's task/none plugin nothing pins the task: its allocation must still bound the threads."""
    machine = available_cores({})
    assert machine >= 1
    assert available_cores({"SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": str(machine)}) == 1
    assert available_cores({"SLURM_CPUS_ON_NODE": "1"}) == 1
    assert available_cores({"SLURM_CPUS_PER_TASK": str(machine + 100)}) == machine  # never above the mask


def test_cpu_threads_must_not_be_negative():
    assert load_config("smoke", ["train.cpu_threads=3"]).train.cpu_threads == 3
    with pytest.raises(ConfigError, match=r"'train.cpu_threads' = -1: must be 0 \(automatic\) or more"):
        load_config("smoke", ["train.cpu_threads=-1"])


@pytest.mark.timeout(300)
def test_two_processes_train_the_real_command(fashion_shards, tmp_path):
    run = tmp_path / "run"
    # OMP_NUM_THREADS=7 as a user's shell might have it (OpenMP caps it at the cores): distgan shares the cores
    # between the processes instead (train.cpu_threads=0)
    proc = launch(train_args(fashion_shards, run, "data.num_workers=2"), processes=2, timeout=240, module=True,
                  env=cpu_env(OMP_NUM_THREADS="7"))
    log = proc.stdout + proc.stderr
    assert "rank 0/2" in log and "rank 1/2" in log
    assert threads_logged(log, world=2) == [max(1, available_cores() // 2)] * 2
    assert steps_logged(run) == [5, 10, 15, 20]
    assert (run / "generator_ema.safetensors").is_file() and (run / "progress.gif").is_file()
    assert "per-rank batch 8" in log  # global batch 16 over 2 processes


@pytest.mark.timeout(200)
def test_one_process_uses_every_core_despite_the_launchers_one_thread(fashion_shards, tmp_path):
    """OMP_NUM_THREADS=1, what accelerate launch passes on by default, must not leave a lone CPU process on one
    core. (A larger value would not do here: OpenMP caps it at the cores, so it cannot tell old from new.)"""
    proc = launch(train_args(fashion_shards, tmp_path / "run", "train.steps=1", "checkpoint.every=1"), processes=1,
                  timeout=150, module=True, env=cpu_env(OMP_NUM_THREADS="1"))
    assert threads_logged(proc.stdout + proc.stderr, world=1) == [available_cores()]


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


@pytest.mark.timeout(200)
def test_batch_per_process_on_two_processes_and_no_resume_on_one(fashion_shards, tmp_path):
    """2 x train.batch_per_process=8 is a global batch of 16, twice the reference 8: linear scaling doubles the
    lrs. The run does not resume on 1 process, where the same keys would make the global batch 8."""
    run, smoke = tmp_path / "run", load_config("smoke")
    keys = ("train.batch_size=8", "train.batch_per_process=8", "train.lr_batch_scaling=linear", "log.every=1",
            "log.sample_every=1000", "log.gif=false")
    proc = launch(train_args(fashion_shards, run, "train.steps=2", *keys), processes=2, timeout=90, module=True)
    assert "global batch 16 (8 per process x 2)" in proc.stdout + proc.stderr
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["images_seen"] for line in lines] == [16, 32]
    assert [line["lr_g"] for line in lines] == pytest.approx([2 * smoke.g_optim.lr] * 2, rel=1e-12)
    with pytest.raises(AssertionError, match=r"error: resuming \S+ on 1 processes: it was trained on 2 with "
                       r"train.batch_per_process=8, so the global batch .* from 16 to 8 mid-run. Resume on 2 "
                       r"processes[\s\S]*exit status 2"):  # one line, exit 2 (the launcher itself exits 1)
        launch(train_args(fashion_shards, run, "train.steps=3", *keys) + ["--resume", "auto"], processes=1,
               timeout=60, module=True)


LAUNCHERS = {  # the two ways to start 2 processes, neither told about the CPU
    "accelerate-multi-gpu": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_cpu_machine_needs_no_variable_for_two_ranks(fashion_shards, tmp_path, launcher):
    """`accelerate launch --multi_gpu --num_processes 2` (and torchrun) without ACCELERATE_USE_CPU on a machine
    without CUDA: distgan asks Accelerate for the CPU and gets 2 gloo ranks (before: refused, or with a plain
    Accelerator 2 silent independent replicas, each "rank 0/1")."""
    env = cpu_env()  # no ACCELERATE_USE_CPU
    run = tmp_path / "run"
    cmd = LAUNCHERS[launcher] + [str(free_port()), "-m"] + train_args(fashion_shards, run, "train.steps=5",
                                                                         "checkpoint.every=5")
    child = start(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = child.communicate(timeout=150)
    finally:
        kill_launched(child)
    assert child.returncode == 0, out[-4000:]
    assert "rank 0/2" in out and "rank 1/2" in out, out[-3000:]
    assert steps_logged(run) == [5]


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


def start_endless_training(shards: Path, run: Path, collective_timeout_s: float) -> subprocess.Popen:
    """2 ranks training "forever" through the README's launch line (kill_launched ends every process of it)."""
    cmd = launch_command(train_args(shards, run, "train.steps=100000", "log.every=1", "checkpoint.every=100000",
                                    f"train.collective_timeout_s={collective_timeout_s}"), processes=2, module=True)
    return start(cmd, cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def training_rank(launcher: subprocess.Popen, run: Path, rank: int) -> psutil.Process:
    """The worker process of ``rank``, once both ranks have logged 3 steps (so every collective is set up)."""
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        assert launcher.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if "distgan.train" in " ".join(p.cmdline())]
    found = [p for p in workers if p.environ().get("RANK") == str(rank)]
    assert len(found) == 1, [p.cmdline() for p in workers]
    return found[0]


@pytest.mark.timeout(240)
def test_a_killed_rank_ends_the_job_in_bounded_time(fashion_shards, tmp_path):
    """A rank that dies ends the job at once, far inside train.collective_timeout_s: the launcher sees the exit
    and ends the other rank (measured: 2 s after the SIGKILL)."""
    run = tmp_path / "run"
    launcher = start_endless_training(fashion_shards, run, collective_timeout_s=30)
    try:
        rank1 = training_rank(launcher, run, rank=1)
        killed_at = time.time()
        rank1.send_signal(signal.SIGKILL)
        out, _ = launcher.communicate(timeout=90)
        elapsed = time.time() - killed_at
        assert launcher.returncode != 0, out[-3000:]
        assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank died"
    finally:
        kill_launched(launcher)


HUNG_TIMEOUT_S = 20  # train.collective_timeout_s for the hung-rank test
# After the timeout the launcher (torch elastic's agent) SIGTERMs the other ranks and waits a fixed 30 s
# (PContext._close's default) before SIGKILL; a stopped process holds SIGTERM pending, so the full 30 s pass.
LAUNCHER_GRACE_S = 30
HUNG_SLACK_S = 40  # the surviving rank's step, traceback and exit on a loaded 2-core machine (measured: 3 s)


@pytest.mark.timeout(300)
def test_a_hung_rank_ends_the_job_within_the_collective_timeout(fashion_shards, tmp_path):
    """A stopped rank (SIGSTOP: alive, never answering) must not hang the job. The other rank's next collective
    times out after train.collective_timeout_s (gloo's own timeout), it exits non-zero, and the launcher ends
    the stopped rank with SIGKILL after its grace. Measured on 2 shared cores: 53 s = 20 s timeout + 3 s + 30 s
    grace. The bound is timeout + grace + slack; no earlier than the timeout, so the timeout is what ended it."""
    run = tmp_path / "run"
    launcher = start_endless_training(fashion_shards, run, collective_timeout_s=HUNG_TIMEOUT_S)
    bound = HUNG_TIMEOUT_S + LAUNCHER_GRACE_S + HUNG_SLACK_S
    try:
        rank1 = training_rank(launcher, run, rank=1)
        stopped_at = time.time()
        rank1.send_signal(signal.SIGSTOP)
        out, _ = launcher.communicate(timeout=bound + 30)  # past the bound: fail with the output, never hang
        elapsed = time.time() - stopped_at
        assert launcher.returncode != 0, out[-3000:]
        # rank 0 may already have waited in the collective before the SIGSTOP, hence the 5 s below the timeout
        assert HUNG_TIMEOUT_S - 5 <= elapsed < bound, f"the job ended {elapsed:.0f} s after a rank hung\n{out[-3000:]}"
        assert "Timed out" in out, out[-3000:]  # rank 0's collective timed out (gloo's message)
    except subprocess.TimeoutExpired:
        kill_launched(launcher)
        pytest.fail(f"the job did not end within {bound + 30} s of a rank hanging\n{launcher.communicate()[0][-3000:]}")
    finally:
        kill_launched(launcher)


PREPARE_S, PREPARE_COLLECTIVE_TIMEOUT_S = 12, 5  # rank 0's first-use prepare below takes longer than the timeout
SLOW_PREPARE = '''"""Test shim: data.prepare takes {seconds} s (a download), then data.path is a copy of {shards!r}."""
import shutil
import time

import distgan.first_use


def slow_prepare(data):
    time.sleep({seconds})
    shutil.copytree({shards!r}, data.path)


distgan.first_use.prepare_data = slow_prepare
'''


@pytest.mark.timeout(240)
def test_first_use_on_two_ranks_waits_for_rank_0_beyond_the_collective_timeout(fashion_shards, tmp_path):
    """Rank 0 makes data.path on first use (a download can take minutes) while rank 1 waits for it: under
    data.prepare_timeout_s, not under train.collective_timeout_s, which would end the job here (5 s against 12)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLOW_PREPARE.format(seconds=PREPARE_S, shards=str(fashion_shards)))
    env = cpu_env()
    env["PYTHONPATH"] = f"{shim}:{env['PYTHONPATH']}"  # every process of the launch imports the shim at start-up
    data, run = tmp_path / "data", tmp_path / "run"
    started = time.time()
    launch(train_args(data, run, "data.prepare=fashion-mnist", "train.steps=5", "log.every=1",
                      f"train.collective_timeout_s={PREPARE_COLLECTIVE_TIMEOUT_S}"), processes=2, timeout=180,
           env=env, module=True)
    assert time.time() - started > PREPARE_S  # the shim ran: rank 1 did wait that long
    assert (data / "dataset.json").is_file() and steps_logged(run) == [1, 2, 3, 4, 5]
