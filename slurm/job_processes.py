"""Finding and ending the processes of a local Slurm cluster: its jobs' processes, and its daemons by PID.

Used by cluster.py (LocalSlurmCluster) and its CLI's ``stop``; nothing here is found by process name
alone, so another cluster's (or another user's) processes are never touched.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable

import psutil

log = logging.getLogger(__name__)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet collected by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def send(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each PID; one that has already gone is skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def terminate(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM the PIDs, wait up to ``grace`` seconds, then SIGKILL the survivors."""
    pids = [p for p in pids if alive(p)]
    send(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    survivors = [p for p in pids if alive(p)]
    if survivors:
        log.warning("pids %s ignored SIGTERM for %.0f s: SIGKILL", survivors, grace)
        send(survivors, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in survivors):
        time.sleep(0.05)


def cluster_processes(root: Path, job_id: int | None = None, node: str | None = None,
                      env: dict[str, str] | None = None, uid: int | None = None) -> list[int]:
    """PIDs of the job processes of the cluster whose state folder is ``root``.

    Job processes carry the cluster's SLURM_CONF, SLURM_JOB_ID and SLURMD_NODENAME in their
    environment. slurmstepd clears its own environment, so it is known by its title
    (``slurmstepd: [JOB.STEP]``) and by the slurmd log of its node that it keeps open.
    ``job_id`` and ``node`` narrow the result to one job and one node; ``env`` to the processes
    whose environment has these values (e.g. ``{"RANK": "1"}``: one training process; never slurmstepd);
    ``uid`` to the processes of that user.
    """
    conf, logs = str(root / "slurm.conf"), root / "log"
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        if proc.pid in me or (uid is not None and proc.info["uids"] and proc.info["uids"].real != uid):
            continue
        try:
            title = " ".join(proc.info["cmdline"] or [])
            step = re.match(r"slurmstepd: \[(\d+)\.", title)
            if step:
                job = step.group(1)
                opened = [Path(f.path) for f in proc.open_files()]
                on = next((f.stem.removeprefix("slurmd-") for f in opened if f.parent == logs), None)
                if on is None or env:
                    continue
            else:
                environ = proc.environ()
                if environ.get("SLURM_CONF") != conf or "SLURM_JOB_ID" not in environ:
                    continue  # another cluster's, or a daemon or client command
                if any(environ.get(k) != v for k, v in (env or {}).items()):
                    continue
                job, on = environ["SLURM_JOB_ID"], environ.get("SLURMD_NODENAME")
        except (psutil.Error, OSError):
            continue
        if (job_id is None or job == str(job_id)) and (node is None or on == node):
            found.append(proc.pid)
    return found


def stop_cluster(root: Path, daemons: Iterable[int], grace: float = 10.0, cancel: bool = True,
                 uid: int | None = None) -> None:
    """Cancel every job, wait for its processes, end the ``daemons`` by PID, then kill job leftovers
    (only user ``uid``'s, when given: the CLI signals nothing that another user runs).

    The daemons go last but one: a slurmd whose slurmstepd are still running waits for them, and a
    slurmstepd whose slurmd is gone lingers (it ignores SIGTERM).
    """
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    try:  # without a slurmctld (``cancel`` False) scancel would retry for a while: skip it
        if cancel:
            subprocess.run(["scancel", "--quiet", "--user", str(os.getuid())], env=env,
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("scancel failed while stopping %s: %s", root, err)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and cluster_processes(root, uid=uid):
        time.sleep(0.2)
    terminate(daemons, grace)
    leftovers = cluster_processes(root, uid=uid)
    if leftovers:
        log.warning("killing job processes left behind: %s", leftovers)
        terminate(leftovers, grace=1)
