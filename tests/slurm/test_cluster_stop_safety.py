"""``python slurm/cluster.py stop --dir DIR`` signals the PIDs listed in DIR/cluster.json: it must signal only
daemons that ``start`` started (same command line, same start time) and refuse a folder, or a state file,
that it did not make or that others may write. Fast: no cluster; the would-be victim is a sleeping
process this test starts, listed in a state file this test writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(REPO / "slurm" / "cluster.py")]


@pytest.fixture
def victim():
    """A process that is not a Slurm daemon: stop must never signal it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def write_state(folder: Path, proc: subprocess.Popen, create_time: float | None = None) -> Path:
    """cluster.json as `start` writes it, listing ``proc`` as slurmctld (its real command line and start time)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    info = psutil.Process(proc.pid)
    daemon = {"pid": proc.pid, "cmdline": info.cmdline(),
              "create_time": info.create_time() if create_time is None else create_time}
    path = folder / "cluster.json"
    path.write_text(json.dumps({"conf": str(folder / "slurm.conf"), "uid": os.getuid(), "daemons": {"slurmctld": daemon}}))
    path.chmod(0o600)
    return path


def stop(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "stop", "--dir", str(folder)], capture_output=True, text=True, timeout=60)


def still_runs(proc: subprocess.Popen) -> bool:
    time.sleep(0.2)
    return proc.poll() is None


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cluster.py stop: "), done.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_a_folder_others_can_write_is_refused(tmp_path, victim):
    folder = tmp_path / "shared"
    write_state(folder, victim)
    folder.chmod(0o777)  # anyone could have written cluster.json here
    assert_refused(stop(folder), "writable by others", "chmod go-w")
    assert still_runs(victim)


def test_a_state_file_others_can_write_is_refused(tmp_path, victim):
    folder = tmp_path / "c"
    write_state(folder, victim).chmod(0o666)
    assert_refused(stop(folder), "state file", "writable by others")
    assert still_runs(victim)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_is_refused(tmp_path, victim):
    folder = tmp_path / "theirs"
    write_state(folder, victim)
    os.chown(folder, 65534, 65534)  # nobody
    assert_refused(stop(folder), "belongs to uid 65534")
    assert still_runs(victim)


def test_a_folder_start_did_not_make_is_refused(tmp_path):
    assert_refused(stop(tmp_path), "cluster.json does not exist", "nothing to stop")


def test_a_listed_pid_that_is_another_process_now_is_not_signalled(tmp_path, victim):
    """The PID of a daemon that died may be reused: the start time tells the two apart."""
    folder = tmp_path / "c"
    write_state(folder, victim, create_time=psutil.Process(victim.pid).create_time() - 100)
    done = stop(folder)
    assert done.returncode == 0 and "stopped 0 daemon(s)" in done.stdout, done.stderr
    assert still_runs(victim)
