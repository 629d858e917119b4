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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import psutil

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE")
STATE_FILE = "cluster.json"  # daemon PIDs, for `cluster.py stop` from another process


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
# Written by slurm/cluster.py: a {len(names)}-node cluster on this one machine.
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


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet collected by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def terminate(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM the PIDs, wait up to ``grace`` seconds, then SIGKILL the survivors."""
    pids = [p for p in pids if _alive(p)]
    _kill(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    survivors = [p for p in pids if _alive(p)]
    if survivors:
        log.warning("pids %s ignored SIGTERM for %.0f s: SIGKILL", survivors, grace)
        _kill(survivors, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in survivors):
        time.sleep(0.05)


def cluster_processes(root: Path, job_id: int | None = None, node: str | None = None) -> list[int]:
    """PIDs of the job processes of the cluster whose state folder is ``root``.

    Job processes carry the cluster's SLURM_CONF, SLURM_JOB_ID and SLURMD_NODENAME in their
    environment. slurmstepd clears its own environment, so it is known by its title
    (``slurmstepd: [JOB.STEP]``) and by the slurmd log of its node that it keeps open.
    ``job_id`` and ``node`` narrow the result to one job and one node.
    """
    conf, logs = str(root / "slurm.conf"), root / "log"
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in me:
            continue
        try:
            title = " ".join(proc.info["cmdline"] or [])
            step = re.match(r"slurmstepd: \[(\d+)\.", title)
            if step:
                job = step.group(1)
                opened = [Path(f.path) for f in proc.open_files()]
                on = next((f.stem.removeprefix("slurmd-") for f in opened if f.parent == logs), None)
                if on is None:
                    continue
            else:
                env = proc.environ()
                if env.get("SLURM_CONF") != conf or "SLURM_JOB_ID" not in env:
                    continue  # another cluster's, or a daemon or client command
                job, on = env["SLURM_JOB_ID"], env.get("SLURMD_NODENAME")
        except (psutil.Error, OSError):
            continue
        if (job_id is None or job == str(job_id)) and (node is None or on == node):
            found.append(proc.pid)
    return found


def stop_cluster(root: Path, daemons: Iterable[int], grace: float = 10.0, cancel: bool = True) -> None:
    """Cancel every job, wait for its processes, end the ``daemons`` by PID, then kill job leftovers.

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
    while time.monotonic() < deadline and cluster_processes(root):
        time.sleep(0.2)
    terminate(daemons, grace)
    leftovers = cluster_processes(root)
    if leftovers:
        log.warning("killing job processes left behind: %s", leftovers)
        terminate(leftovers, grace=1)


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

    def _save_state(self) -> None:
        state = {"conf": str(self.conf), "pids": self.pids}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))

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
        _kill([self.pids[name], *(cluster_processes(self.root, node=name) if kill_jobs else [])], signal.SIGKILL)
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

    def job_pids(self, job_id: int, node: str | None = None) -> list[int]:
        """PIDs of the job's processes (batch shell, steps, slurmstepd), optionally on one node."""
        return cluster_processes(self.root, job_id=job_id, node=node)


# -- CLI -----------------------------------------------------------------------------------------
def _running_daemons(root: Path) -> dict[str, int]:
    """The daemons recorded in ``root``'s state file that still run (checked by command line: PIDs get reused)."""
    path = root / STATE_FILE
    if not path.is_file():
        return {}
    state = json.loads(path.read_text())
    alive = {}
    for name, pid in state["pids"].items():
        try:
            if state["conf"] in psutil.Process(pid).cmdline() and _alive(pid):
                alive[name] = pid
        except psutil.Error:
            pass
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="state folder (slurm.conf, logs, spool)")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.dir.resolve()
    running = _running_daemons(root)
    if args.action == "stop":
        stop_cluster(root, running.values(), cancel="slurmctld" in running)
        print(f"stopped {len(running)} daemon(s) of {root / 'slurm.conf'}; now: unset SLURM_CONF")
        return 0
    if running:
        parser.error(f"a cluster already runs in {root} (pids {running}): stop it first")
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalSlurmCluster(root, nodes=args.nodes)
    cluster.__enter__()  # the daemons outlive this command; `stop` ends them by the PIDs in cluster.json
    print(f"export SLURM_CONF={cluster.conf}")
    print(f"# then: sbatch ...; stop with: python {sys.argv[0]} stop --dir {root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
