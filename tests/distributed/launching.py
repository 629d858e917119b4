"""Run commands through the real launcher with a timeout: no multi-process test may hang CI.

The commands are the README's own: ``accelerate launch --config_file launch/cpu.yaml`` for one process and
``accelerate launch --config_file launch/cpu-2proc.yaml`` for two (no ACCELERATE_USE_CPU: distgan asks for the
CPU itself when there is no CUDA), so a broken launch file fails the tests, not a user.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
# processes -> the launch/ file the README uses for them (paths relative to REPO, as the README writes them)
LAUNCH_CONFIGS = {1: "launch/cpu.yaml", 2: "launch/cpu-2proc.yaml"}
LAUNCH_TAG = "DISTGAN_TEST_LAUNCH"  # environment variable marking every process one launch started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU launch: wandb offline, this working tree first, and no ACCELERATE_USE_CPU (a user
    does not need it: the tests prove that)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": path, **extra}
    # For scripts that do not go through distgan's trainer (it ignores this and follows train.cpu_threads):
    # tiny models run fastest on one thread per process on few cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WORLD_SIZE", None)
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def launch_command(args: list[str], processes: int, module: bool = False) -> list[str]:
    """The README's ``accelerate launch --config_file launch/...`` line for ``processes`` (1 or 2) CPU processes."""
    if processes not in LAUNCH_CONFIGS:
        raise ValueError(f"no launch/ file for {processes} processes; have {sorted(LAUNCH_CONFIGS)}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", LAUNCH_CONFIGS[processes]]
    if processes > 1:
        cmd += ["--main_process_port", str(free_port())]  # tests run side by side: never the default 29500
    return cmd + (["-m"] if module else []) + args


def start(cmd: list[str], env: dict[str, str], **popen: object) -> subprocess.Popen:
    """Popen ``cmd`` from the repo root, every process it starts tagged (an environment variable) so that
    kill_launched finds them all: torch's launcher puts each worker in a session of its own, out of reach of
    a process-group kill."""
    tag = uuid.uuid4().hex
    child = subprocess.Popen(cmd, cwd=REPO, env={**env, LAUNCH_TAG: tag}, start_new_session=True, **popen)
    child.launch_tag = tag  # type: ignore[attr-defined]
    return child


def kill_launched(child: subprocess.Popen) -> None:
    """SIGKILL ``child`` (a start() result) and every process carrying its tag, then reap it. Also after a clean
    exit: a worker that outlived its launcher would hold ports and cores (a stopped one forever)."""
    tag = getattr(child, "launch_tag", None)
    if child.poll() is None:
        child.kill()
    for proc in psutil.process_iter():
        try:
            if tag is not None and proc.pid != os.getpid() and proc.environ().get(LAUNCH_TAG) == tag:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    child.wait()


def launch(args: list[str], processes: int, timeout: float, env: dict | None = None,
           module: bool = False) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments, or a module with ``module=True``) on ``processes`` CPU processes
    through the README's launch line; raise AssertionError with the output tails when it exits non-zero or
    outlives ``timeout`` (then every process it started is killed first, so a hung rank never outlives its test).
    """
    cmd = launch_command(args, processes, module)
    child = start(cmd, env or cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launched(child)
        stdout, stderr = child.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not end within {timeout} s (killed)\n--- stdout\n"
                             f"{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}") from None
    finally:
        kill_launched(child)
    if child.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {child.returncode}\n--- stdout\n{stdout[-4000:]}\n"
                             f"--- stderr\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
