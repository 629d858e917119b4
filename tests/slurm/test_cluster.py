"""The local Slurm cluster (slurm/cluster.py), and slurm/train.sh's wiring on it: ranks per node.

train.sh always runs ``accelerate launch -m distgan.train``; the wiring test submits it from a folder
holding a stand-in ``distgan/train.py`` (``python -m`` looks in the working folder first), which
keeps train.sh's contract: it reports its ranks and an all_reduce, honours ``RUN_DIR/STOP`` and
writes ``generator_ema.safetensors`` when it finishes. That isolates the script from the trainer; test_train_sh.py runs it with the real trainer
(a whole run, preemption and requeue, scancel, a killed rank).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from compare import assert_same_text

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"

FAKE_TRAINER = '''\
"""Stand-in for distgan.train with train.sh's contract (written by tests/slurm/test_cluster.py)."""
import argparse, os, time
from pathlib import Path
import torch
import torch.distributed as dist
from accelerate import Accelerator

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--resume", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
overrides = dict(o.split("=", 1) for o in args.overrides)
run_dir, steps = Path(overrides["run.dir"]), int(overrides["train.steps"])
step_time = float(overrides.get("fake.step_time", "0"))
ckpt = run_dir / "checkpoints" / "step.txt"
acc = Accelerator()
start = int(ckpt.read_text()) if args.resume == "auto" and ckpt.exists() else 0
total = torch.tensor([acc.process_index + 1.0])
dist.all_reduce(total)
print(f"RESULT rank={acc.process_index} world={acc.num_processes} node={os.environ['SLURMD_NODENAME']} "
      f"nodeid={os.environ['SLURM_NODEID']} backend={dist.get_backend()} sum={total.item():g} "
      f"threads={torch.get_num_threads()} config={args.config} run_dir={run_dir} start={start} "
      f"cuda_visible={os.environ.get('CUDA_VISIBLE_DEVICES', '-')} debug={os.environ.get('ACCELERATE_DEBUG_MODE', '-')}",
      flush=True)
step = start
while step < steps:
    time.sleep(step_time)
    step += 1
    stop = torch.tensor([float((run_dir / "STOP").exists())])
    dist.broadcast(stop, 0)  # every rank stops after the same step
    if stop.item():
        break
acc.wait_for_everyone()
if acc.is_main_process:
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(str(step))
    if step < steps:
        (run_dir / "STOP").unlink()
    else:  # a finished run exports its generator; train.sh tells "finished" from "stopped" by it
        (run_dir / "generator_ema.safetensors").write_text("stand-in")
    print(f"stopped at step {step}" if step < steps else f"finished at step {step}", flush=True)
acc.wait_for_everyone()
dist.destroy_process_group()
'''


def gone(pid: int) -> bool:
    """True once ``pid`` is dead. A dead job process may stay a zombie for a moment: slurmstepd
    is a child of init here, which collects its children lazily; a zombie runs nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


FAKE_CONFIG = '''\
"""Stand-in for distgan.config: train.sh loads the config (with the overrides) to learn run.dir, data.num_workers
and train.mixed_precision."""
from types import SimpleNamespace

def load_config(name, overrides=()):
    values = {"run.dir": "runs/default", "data.num_workers": 0, "train.mixed_precision": "auto",
              **dict(o.split("=", 1) for o in overrides)}
    return SimpleNamespace(run=SimpleNamespace(dir=values["run.dir"]),
                           data=SimpleNamespace(num_workers=int(values["data.num_workers"])),
                           train=SimpleNamespace(mixed_precision=values["train.mixed_precision"]))
'''


@pytest.fixture
def submit_dir(tmp_path: Path) -> Path:
    """A working folder for train.sh: its logs/ folder and the stand-in distgan.train (and distgan.config)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "distgan").mkdir()
    (tmp_path / "distgan" / "__init__.py").write_text("")
    (tmp_path / "distgan" / "train.py").write_text(FAKE_TRAINER)
    (tmp_path / "distgan" / "config.py").write_text(FAKE_CONFIG)
    return tmp_path


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # keep the folder on sys.path
    return env


def results(log: str) -> list[dict[str, str]]:
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in log.splitlines() if line.startswith("RESULT ")]


@pytest.mark.timeout(90)
def test_two_node_job_runs_one_task_on_each_node(slurm_cluster, tmp_path):
    slurm_cluster.wait_nodes_idle(30)
    assert slurm_cluster.node_states() == {"n1": "idle", "n2": "idle", "n3": "idle"}
    out = tmp_path / "hosts.out"
    job = slurm_cluster.sbatch("#!/bin/bash\nsrun bash -c 'echo task $SLURM_NODEID on $SLURMD_NODENAME $(hostname)'\n",
                               "--nodes=2", "--ntasks-per-node=1", f"--output={out}")
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", out.read_text()
    tasks = sorted(line.split()[1:4] for line in out.read_text().splitlines() if line.startswith("task "))
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert tasks == [["0", "on", "n1"], ["1", "on", "n2"]]
    assert out.read_text().count(host) == 2
    assert slurm_cluster.job_info(job)["NodeList"] == "n[1-2]"


@pytest.mark.timeout(150)
def test_train_sh_launches_one_rank_per_node_over_gloo(slurm_cluster, submit_dir):
    run_dir = submit_dir / "runs" / "wiring"
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").touch()  # stale, from an earlier run: train.sh must remove it before training
    # a user's default accelerate config (gpu_ids, debug) must not leak into the job: train.sh passes its own
    hf = submit_dir / "hf" / "accelerate"
    hf.mkdir(parents=True)
    (hf / "default_config.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                                            "gpu_ids: '0'\ndebug: true\nnum_machines: 1\n")
    env = {**job_env(), "CONFIG": "smoke.yaml", "RUN_DIR": str(run_dir), "HF_HOME": str(submit_dir / "hf")}
    job = slurm_cluster.sbatch(TRAIN_SH, "--nodes=2", "--cpus-per-task=1", env=env, cwd=submit_dir,
                               script_args=["train.steps=5"])
    state = slurm_cluster.wait(job, timeout=120)
    log = (submit_dir / "logs" / f"distgan-{job}.out").read_text()
    assert state == "COMPLETED", log

    # one rank on each node; which node gets rank 0 is the c10d rendezvous's choice (sorted host names and
    # launcher PIDs: on this one-host cluster, either), not SLURM_NODEID's
    ranks = sorted(results(log), key=lambda r: int(r["nodeid"]))
    assert sorted(r["rank"] for r in ranks) == ["0", "1"], log
    assert [(r["nodeid"], r["node"]) for r in ranks] == [("0", "n1"), ("1", "n2")]
    assert {r["world"] for r in ranks} == {"2"}
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert {r["sum"] for r in ranks} == {"3"}  # all_reduce of 1 + 2 across the two nodes
    assert {r["threads"] for r in ranks} == {"1"}  # --cpus-per-task=1, one process per node
    assert {(r["config"], r["run_dir"], r["start"]) for r in ranks} == {("smoke.yaml", str(run_dir), "0")}
    assert "finished at step 5" in log and "training finished" in log  # the stale STOP file did not stop it
    assert_same_text((run_dir / "checkpoints" / "step.txt").read_text(), "5", "step.txt")
    assert not (run_dir / "STOP").exists()
    assert {(r["cuda_visible"], r["debug"]) for r in ranks} == {("-", "-")}  # the default config was not read
    assert f"main 127.0.0.1:{20000 + job % 10000}" in log
    assert "Traceback" not in log and "DistNetworkError" not in log, log  # c10d: no exit-barrier traceback


@pytest.mark.timeout(90)
def test_leaving_the_context_ends_every_process_it_started(cluster_lib, tmp_path):
    with cluster_lib.LocalSlurmCluster(tmp_path / "c", nodes=2) as cluster:
        job = cluster.sbatch("#!/bin/bash\nsrun sleep 300\n", "--nodes=2", f"--output={tmp_path}/sleep.out")
        cluster.wait(job, timeout=30, states=("RUNNING",))
        deadline = time.monotonic() + 20
        while len(cluster.job_pids(job, node="n2")) < 2:  # slurmstepd and sleep on the second node
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.2)
        daemons, jobs = list(cluster.pids.values()), cluster.job_pids(job)
    assert len(daemons) == 3 and len(jobs) >= 5  # batch shell, srun, 2 slurmstepd, 2 sleep
    assert [p for p in daemons if not gone(p)] == []  # our children: reaped, os.kill(pid, 0) fails
    assert [p for p in jobs if not gone(p)] == []


@pytest.mark.timeout(90)
def test_cli_starts_and_stops_a_cluster(cluster_lib, tmp_path):
    cli = [sys.executable, str(REPO / "slurm" / "cluster.py")]
    started = subprocess.run([*cli, "start", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    conf = re.fullmatch(r"export SLURM_CONF=(\S+)\n", started.stdout).group(1)
    state = json.loads((tmp_path / "cluster.json").read_text())
    try:
        sinfo = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], capture_output=True,
                               text=True, env={**os.environ, "SLURM_CONF": conf}, timeout=30)
        assert sinfo.stdout.split() == ["n1", "idle", "n2", "idle"]
    finally:
        stopped = subprocess.run([*cli, "stop", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert sorted(state["daemons"]) == ["n1", "n2", "slurmctld"]
    assert stopped.stdout.startswith("stopped 3 daemon(s)"), stopped.stdout  # each matched what start recorded
    assert [d["pid"] for d in state["daemons"].values() if not gone(d["pid"])] == []
