"""Slurm on this machine: install Debian's packages when missing, and write the slurm.conf of a local cluster.

Used by cluster.py (LocalSlurmCluster); everything here is plain functions with no running daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt, no package)."""


def ensure_slurm_installed() -> None:
    """Install Debian's slurmctld, slurmd and slurm-client with apt-get when a binary is missing."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries missing and not root: install {' '.join(PACKAGES)} "
                               "(apt-get install) or run as root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm binaries missing and no apt-get: install {' '.join(PACKAGES)}")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    apt = dict(env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, text=True)
    done = subprocess.run(install, **apt)
    if done.returncode != 0:  # stale or missing package lists: refresh once and retry
        subprocess.run(["apt-get", "update"], **apt)
        done = subprocess.run(install, **apt)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if done.returncode != 0 or missing:
        raise SlurmUnavailable(f"`{' '.join(install)}` failed (rc={done.returncode}, missing {missing}):\n"
                               f"{done.stderr[-2000:]}")


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free now (all bound at once, so they are distinct)."""
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_hardware() -> str:
    """The CPU layout slurmd itself detects (`slurmd -C`), so nodes register without INVAL."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    found = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    return " ".join(f"{k}={found[k]}" for k in keys if k in found)


def write_config(root: Path, names: Sequence[str], ctld_port: int, node_ports: Sequence[int],
                 slurmd_timeout: int = 10, kill_wait: int = 10, requeue_delay: int = 10) -> Path:
    """Write slurm.conf for nodes ``names``, all on localhost; return its path.

    ``slurmd_timeout``: seconds before a silent slurmd is DOWN (a killed node is noticed after 2-3x this).
    ``kill_wait``: seconds between SIGTERM and SIGKILL at the time limit or on scancel.
    ``requeue_delay``: a requeued job waits this long (plus ~1 s) before it may start again; it is
    Slurm's step credential lifetime (cred_expire, 120 s by default), hence not much below 10.
    """
    for sub in ("state", "log", "run", *(f"spool/{n}" for n in names)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    hardware = node_hardware()
    nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} {hardware} State=UNKNOWN"
                      for n, p in zip(names, node_ports))
    first_job_id = 1000 + int(time.time()) % 900_000  # a fresh cluster must not reuse runs/<name>-<job id>
    conf = f"""\
# Written by slurm/slurm_conf.py: a {len(names)}-node cluster on this one machine.
ClusterName=distgan
FirstJobId={first_job_id}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Schedule every second, not every 30-60 s: a requeued job would otherwise wait for the next pass.
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
# Requeue and preemption: requeue allowed and restarted soon, SIGTERM->SIGKILL grace,
# finished jobs stay visible to `scontrol show job` (there is no accounting daemon).
JobRequeue=1
AuthInfo=cred_expire={requeue_delay}
KillWait={kill_wait}
MinJobAge=3600
# A dead slurmd is noticed quickly and comes back on its own when restarted.
SlurmdTimeout={slurmd_timeout}
ReturnToService=2
{nodes}
PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP
"""
    path = root / "slurm.conf"
    path.write_text(conf)
    return path
