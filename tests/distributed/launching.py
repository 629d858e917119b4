"""Run commands through the real launcher with a timeout: no multi-process test may hang CI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process is fastest on few cores
    env.pop("WORLD_SIZE", None)
    return env


def launch(args: list[str], processes: int, timeout: float, env: dict | None = None,
           module: bool = False) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N`` (gloo DDP on CPU) or plain python for N = 1."""
    if processes == 1:
        cmd = [sys.executable] + (["-m"] if module else []) + args
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())] + (["-m"] if module else []) + args
    proc = subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc
