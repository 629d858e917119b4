"""A real Slurm cluster of N nodes on this one machine, for tests and for trying slurm/train.sh by hand.

One slurmctld and N ``slurmd -N nK`` daemons (Debian's Slurm 22.05), all configured through a
slurm.conf in a temporary folder that every client command reaches via SLURM_CONF; /etc/slurm is
never read or written. The daemons run in the foreground (``-D``) as children of this process, and
stopping the cluster ends exactly those PIDs, plus any job process still carrying this cluster's
SLURM_CONF, so nothing is left behind.

    with LocalSlurmCluster() as cluster:
        job = cluster.sbatch("#!/bin/bash\\nsrun hostname", "--nodes=2")
        assert cluster.wait(job, timeout=60) == "COMPLETED"

CLI (for people trying train.sh by hand):

    python slurm/cluster.py start --dir /tmp/slurm    # prints `export SLURM_CONF=...`
    python slurm/cluster.py stop --dir /tmp/slurm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import psutil

# Siblings in slurm/ (on sys.path when run as a script; tests/slurm/conftest.py puts it there).
from job_processes import alive, cluster_processes, send, stop_cluster
from slurm_conf import SlurmUnavailable, ensure_slurm_installed, free_ports, write_config

__all__ = ["LocalSlurmCluster", "SlurmUnavailable", "ensure_slurm_installed", "FINAL_STATES"]

log = logging.getLogger(__name__)

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE")
STATE_FILE = "cluster.json"  # daemon PIDs, for `cluster.py stop` from another process


class LocalSlurmCluster:
    """slurmctld plus ``nodes`` slurmd daemons (n1, n2, ...) on localhost, as a context manager."""

    def __init__(self, workdir: Path | None = None, nodes: int = 2, start_timeout: float = 60.0,
                 slurmd_timeout: int = 10, kill_wait: int = 10, requeue_delay: int = 10) -> None:
        """``workdir``: state folder (default: a temporary one, removed at stop); the rest: see write_config."""
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="distgan-slurm-")
        self.root = Path(workdir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.start_timeout = start_timeout
        self.options = dict(slurmd_timeout=slurmd_timeout, kill_wait=kill_wait, requeue_delay=requeue_delay)
        self.conf = self.root / "slurm.conf"
        self.env: dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}  # daemon name (slurmctld, n1, n2, ...) -> PID
        self._procs: dict[str, subprocess.Popen] = {}
        self._started: dict[str, dict] = {}  # daemon name -> pid, cmdline, create_time (saved in cluster.json)

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ensure_slurm_installed()
        ports = free_ports(1 + len(self.names))
        write_config(self.root, self.names, ports[0], ports[1:], **self.options)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name in self.names:
            self._spawn(name, ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._save_state()
        self.wait_nodes_idle(self.start_timeout)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        env = {**self.env, "SLURMD_NODENAME": name} if name != "slurmctld" else self.env
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        out.close()
        self._procs[name] = proc
        self.pids[name] = proc.pid
        # What `cluster.py stop` checks before it signals a PID: the same program, started at the same time.
        self._started[name] = {"pid": proc.pid, "cmdline": argv, "create_time": psutil.Process(proc.pid).create_time()}

    def _save_state(self) -> None:
        state = {"conf": str(self.conf), "uid": os.getuid(), "daemons": self._started}
        path = self.root / STATE_FILE
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # ours, and only ours to write
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(state, indent=1))

    def stop(self, grace: float = 10.0) -> None:
        """Cancel every job, then end the daemons this cluster started (by PID) and any job leftovers."""
        if self._procs:
            ctld = self._procs.get("slurmctld")
            stop_cluster(self.root, [p.pid for p in self._procs.values() if p.poll() is None], grace,
                         cancel=ctld is not None and ctld.poll() is None)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not exit", proc.args, proc.pid)
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def stop_node(self, name: str, kill_jobs: bool = True) -> None:
        """Kill one node as a hardware failure would: SIGKILL its slurmd and (by default) its job processes.

        Slurm sets the node DOWN after 2-3x ``slurmd_timeout`` and requeues its --requeue jobs. Leave
        it down in a test (use nodes=3 for a 2-node job): brought back with start_node while the
        requeued job runs on it, it gets Slurm's queued signal for the old step, which has the same
        job and step ids, and kills the new one (measured: ~40 s after it returned).
        """
        send([self.pids[name], *(cluster_processes(self.root, node=name) if kill_jobs else [])], signal.SIGKILL)
        self._procs[name].wait(timeout=10)

    def start_node(self, name: str) -> None:
        """Start a node's slurmd again (after stop_node); ReturnToService=2 brings it back to idle."""
        self._spawn(name, ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._save_state()

    # -- status --------------------------------------------------------------------------------
    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"==> {path} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    def node_states(self) -> dict[str, str]:
        """Node name -> state as sinfo prints it (idle, alloc, down*, ...)."""
        done = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False, timeout=10)
        return dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)

    def wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode} at start:\n{self.logs()}")
            states = self.node_states()
            if all(states.get(n) == "idle" for n in self.names):
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s (sinfo: {states}):\n{self.logs()}")

    # -- clients -------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sinfo, squeue, scontrol, ...) against this cluster."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        done = subprocess.run(list(args), env=kw.pop("env", self.env), timeout=timeout, **kw)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, list(args), done.stdout, done.stderr)
        return done

    def sbatch(self, script: str | Path, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None, script_args: Sequence[str] = ()) -> int:
        """Submit ``script`` with sbatch options ``args`` from ``cwd`` (the job's working folder); return the job id.

        ``script`` is a Path to a script file (given ``script_args``), or the text of a script
        (starting with ``#!``); ``env`` adds to the environment the job starts with (sbatch exports it).
        """
        env = {**self.env, **(env or {})}
        if isinstance(script, Path):
            argv, text = ["sbatch", "--parsable", *args, str(script), *script_args], None
        elif script.startswith("#!") and not script_args:
            argv, text = ["sbatch", "--parsable", *args], script
        else:
            raise ValueError(f"sbatch: script must be a Path, or text starting with '#!' and no script_args: "
                             f"got {script[:40]!r}")
        done = self.run(*argv, input=text, env=env, check=False, cwd=cwd)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, NodeList, Restarts, StdOut, ExitCode, ...)."""
        done = self.run("scontrol", "--oneliner", "show", "job", str(job_id), check=False, timeout=10)
        if done.returncode != 0:
            raise KeyError(f"job {job_id} unknown to slurmctld: {done.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float, states: Sequence[str] = FINAL_STATES) -> str:
        """Poll until the job reaches one of ``states``; return it (TimeoutError with logs otherwise).

        A requeued job (scontrol requeue, node failure with --requeue) goes back to PENDING and
        counts ``Restarts`` in job_info; pass ``states=("COMPLETED",)`` to wait through requeues.
        """
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s, waiting for {states}:\n"
                           f"{self.job_info(job_id)}\n{self.logs()}")

    def signal_job(self, job_id: int, sig: str = "USR1", batch: bool = True) -> None:
        """Send a signal as Slurm's --signal would: to the batch shell only (``batch``) or to every step."""
        self.run("scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id))

    def job_pids(self, job_id: int, node: str | None = None, env: dict[str, str] | None = None) -> list[int]:
        """PIDs of the job's processes (batch shell, steps, slurmstepd), optionally on one node, or only
        those whose environment holds ``env`` (``{"RANK": "1"}``: the training process of rank 1)."""
        return cluster_processes(self.root, job_id=job_id, node=node, env=env)

    def wait_job_gone(self, job_id: int, timeout: float) -> list[int]:
        """Wait until none of the job's processes runs on any node; return those still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := self.job_pids(job_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


# -- CLI -----------------------------------------------------------------------------------------
class NotOurs(Exception):
    """A folder or state file that this user's ``cluster.py start`` did not make, or that others could change."""


def check_private(path: Path, what: str) -> None:
    """``path`` (not followed if a link) is owned by this user and writable by no one else; NotOurs otherwise.

    ``stop`` signals the PIDs listed in the folder's state file: a folder (or file) that someone else owns
    or may write could list any process."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise NotOurs(f"{what} {path} is a symbolic link: give the real folder that `cluster.py start` made")
    if st.st_uid != os.getuid():
        raise NotOurs(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): "
                      "give a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NotOurs(f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                      f"chmod go-w {path}, or give a folder only you can write")


def running_daemons(root: Path) -> dict[str, int]:
    """The daemons that ``root``'s state file lists and that still run, as started: the PID's command line
    and start time must be the recorded ones (a PID reused by another process is left alone)."""
    check_private(root, "cluster folder")
    path = root / STATE_FILE
    if not path.exists():
        raise NotOurs(f"{path} does not exist: {root} is not a folder that `cluster.py start` made (nothing to stop)")
    check_private(path, "state file")
    try:
        daemons = json.loads(path.read_text())["daemons"]
    except (ValueError, KeyError, TypeError) as err:
        raise NotOurs(f"{path} is not a state file that `cluster.py start` wrote ({err!r}): stop its daemons by hand")
    running = {}
    for name, daemon in daemons.items():
        try:
            proc = psutil.Process(daemon["pid"])
            if (proc.cmdline() == daemon["cmdline"] and abs(proc.create_time() - daemon["create_time"]) < 0.01
                    and alive(proc.pid)):
                running[name] = proc.pid
        except psutil.Error:
            pass
    return running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="state folder (slurm.conf, logs, spool)")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.dir.absolute()
    try:
        if args.action == "stop":
            running = running_daemons(root)
            stop_cluster(root.resolve(), running.values(), cancel="slurmctld" in running, uid=os.getuid())
            print(f"stopped {len(running)} daemon(s) of {root / 'slurm.conf'}; now: unset SLURM_CONF")
            return 0
        if root.exists() or root.is_symlink():
            check_private(root, "cluster folder")
            running = running_daemons(root) if (root / STATE_FILE).exists() else {}
            if running:
                raise NotOurs(f"a cluster already runs in {root} (pids {running}): stop it first")
        else:
            root.mkdir(parents=True, mode=0o700)
    except NotOurs as err:
        print(f"cluster.py {args.action}: {err}", file=sys.stderr)
        return 2
    cluster = LocalSlurmCluster(root, nodes=args.nodes)
    cluster.__enter__()  # the daemons outlive this command; `stop` ends them by the PIDs in cluster.json
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"# then: sbatch ...; stop with: python {sys.argv[0]} stop --dir {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
