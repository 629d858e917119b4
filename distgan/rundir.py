"""The run directory's guard rails: one writer at a time, no run overwritten, a config history, safe resumes.

- ``claim_run_dir`` (the main process, at start): lock, refuse or set aside, pick and check the checkpoint.
- A lock file (``.lock``: pid, host, Slurm job, start time) admits one training at a time; a lock left by a
  process that is gone (same host, or the same Slurm job requeued), or left empty or torn more than a minute ago,
  is named in the log and taken over. An flock held on it for the run's life makes taking it atomic.
- A fresh start refuses a run dir that already holds results; ``--resume auto`` with no intact checkpoint
  moves earlier results (its damaged checkpoints too) aside (``previous-<time>/``) instead of overwriting them.
- Every start and resume keeps its config in ``configs/`` (config.yaml is the current one); a resume that
  changes a key that shapes the networks or gives the saved state its meaning is refused with the list of
  changed keys; other changes (steps, logging, learning rates) are logged.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from distgan.checkpoint import checkpoint_config, checkpoint_step, find_resume_path, fsync_dir, set_aside_newer
from distgan.config import Config, ConfigError, generator_keys_meant_when_absent
from distgan.errors import shown
from distgan.safe_yaml import YAMLInputError, load_yaml
from distgan.tracking import WANDB_ID_FILE

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
TORN_LOCK_S = 60  # an empty or torn lock file older than this was left by a crash
# what a run dir holds once training has written anything (a fresh start must not overwrite it)
RESULTS = ("metrics.jsonl", "samples", "generator_ema.safetensors", "generator_ema.json", "progress.gif",
           "plots", "checkpoints", "eval.json", "configs", "config.yaml", "wandb", WANDB_ID_FILE, "tensorboard")
# keys that may change when a run is resumed: they do not change shapes or what the saved state means
RESUMABLE_CHANGES = (
    "run.dir", "run.name", "data.path", "data.num_workers", "data.cache_mb", "data.skip_bad_samples",
    "data.allow_pipe", "data.prepare_timeout_s", "g_optim.lr", "d_optim.lr", "train.steps", "train.mixed_precision",
    "train.on_nonfinite", "train.max_grad_norm", "train.collective_timeout_s", "train.stop_check_every",
    "train.cpu_threads",
    "log.", "checkpoint.", "eval.",
)


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (tells a live process from a reused pid), Linux only."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _flock(fd: int) -> Optional[bool]:
    """Take ``fd``'s exclusive flock: True, False when another open file holds it, None where the file system has
    no flock (the file's content alone then decides, as before)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        log.debug("no flock on this file system (%s): the lock file's content alone decides", err)
        return None


def _identity(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _readable(holder: Any) -> bool:
    return isinstance(holder, dict) and "pid" in holder and "host" in holder


# the locks this process holds, by the lock file's (device, inode): a later training of the same process may take
# over one an earlier training never released (its flock would otherwise refuse it)
_HELD_HERE: dict[tuple[int, int], "RunDirLock"] = {}


class RunDirLock:
    """``run_dir/.lock``, held by the main process for the whole training.

    The file says who holds it (pid, host, Slurm job, start time); an exclusive ``flock`` on it, kept for the run's
    life, makes taking it (fresh or over a stale holder) atomic: of two starters only the one holding the flock may
    judge and rewrite it. Whether a holder is gone is judged from the file (the flock does not reach other machines
    on every file system): a pid that has exited on this host, an earlier run of this Slurm job, or, for a file
    left empty or torn by a crash, its age.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.held = False
        self.fd: Optional[int] = None

    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _stale(self, holder: dict[str, Any]) -> Optional[str]:
        """Why the holder is gone, or None when it may still be running."""
        if not _readable(holder):  # empty or torn by a crash: its age decides
            age = float(holder.get("age", 0.0))
            return f"a start that crashed (the file is empty or unreadable, {age:.0f} s old)" if age > TORN_LOCK_S \
                else None
        if holder.get("slurm_job") and holder.get("slurm_job") == os.environ.get("SLURM_JOB_ID"):
            return f"an earlier run of Slurm job {holder['slurm_job']} (requeued)"
        if holder.get("host") == socket.gethostname():
            if holder.get("pid") == os.getpid():
                return "an earlier training in this process"
            start = _process_start(holder["pid"]) if isinstance(holder.get("pid"), int) else None
            if start is None or (holder.get("pid_start") and start != holder["pid_start"]):
                return f"process {holder.get('pid')} on {holder.get('host')}, which has exited"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd, created = self._open()
            if fd is None:
                continue  # released between our two opens: try again
            try:
                if self._take(fd, created):
                    return
            except BaseException:
                os.close(fd)
                raise
        raise ConfigError(f"{self.path}: another training took the run dir while this one started; use one run.dir "
                          "per training")

    def _open(self) -> tuple[Optional[int], bool]:
        try:
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
        except FileExistsError:
            try:
                return os.open(self.path, os.O_RDWR), False
            except FileNotFoundError:
                return None, False

    def _take(self, fd: int, created: bool) -> bool:
        """Hold ``fd``'s lock and write ours into it; False (fd closed) when the file was replaced meanwhile."""
        locked = _flock(fd)
        if locked is False:  # a live process holds it
            holder = self._read(fd)
            earlier = _HELD_HERE.get(_identity(fd))
            reason = self._stale(holder)
            if earlier is None or reason is None:
                raise self._refusal(holder, held=reason is not None)
            earlier._drop()  # an earlier training of this process that never released it
            os.close(fd)
            return False
        if not self._current(fd):  # released (unlinked) or replaced between our open and our lock
            os.close(fd)
            return False
        if not created:
            holder = self._read(fd)
            reason = self._stale(holder)
            if reason is None:
                raise self._refusal(holder, held=False)
            log.warning("taking over %s, left by %s", self.path, reason)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._mine()).encode(), 0)
        os.fsync(fd)
        if created:
            fsync_dir(self.path.parent)
        self.fd, self.held = fd, True
        _HELD_HERE[_identity(fd)] = self
        return True

    def _current(self, fd: int) -> bool:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False
        return _identity(fd) == (stat.st_dev, stat.st_ino)

    def _read(self, fd: int) -> dict[str, Any]:
        """The holder the file names, or ``{"age": seconds}`` when it is empty or torn (written half by a crash)."""
        try:
            holder = json.loads(os.pread(fd, 1 << 16, 0))
        except ValueError:
            holder = None
        if _readable(holder):
            return holder
        return {"age": time.time() - os.fstat(fd).st_mtime}

    def _refusal(self, holder: dict[str, Any], held: bool) -> ConfigError:
        if not _readable(holder):
            return ConfigError(
                f"run dir {self.path.parent}: {self.path} is empty or unreadable and {holder['age']:.0f} s old "
                f"(another training starting right now, or one that crashed while starting): start again in a minute (after "
                f"{TORN_LOCK_S} s it counts as left by a crash), or delete it if no training uses this run dir")
        if held:  # the file names a process that is gone, but a live one holds the flock
            return ConfigError(
                f"run dir {self.path.parent} is being taken by another training right now ({self.path} is locked by "
                f"a running process although it names process {holder.get('pid')} on {holder.get('host')}, which has "
                f"exited, or a process it started still runs): wait for it or stop it, or use another run.dir")
        return ConfigError(
            f"run dir {self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
            f"{holder.get('since')}): wait for it to finish or stop it. If it is gone (a crashed node), delete "
            f"{self.path}")

    def _drop(self) -> None:
        """Close the file without removing it (another lock of this process takes it over)."""
        if self.fd is not None:
            _HELD_HERE.pop(_identity(self.fd), None)
            os.close(self.fd)
        self.fd, self.held = None, False

    def release(self) -> None:
        if self.held and self.fd is not None:
            if self._current(self.fd):  # never the file of a training that took it over
                self.path.unlink(missing_ok=True)
            self._drop()


# what distgan (and its trackers, wandb/ and tensorboard/: any content) writes inside each folder of RESULTS
_OWN_ENTRIES = {
    "samples": re.compile(r"g(_ema)?-step-\d{8,}\.png|\..*\.tmp\.png"),
    "plots": re.compile(r"[a-z0-9_]+\.png|\..*\.tmp\.png"),
    "checkpoints": re.compile(r"step-\d{8}|best|abandoned-[\d-]+|\.tmp-step-\d{8}-\d+|\.replaced-step-\d{8}-\d+"),
    "configs": re.compile(r"\d{4}-(start|resume)-step-\d{8,}\.yaml"),
}
# what a run dir holds only once a step has completed (a start that crashed earlier leaves config.yaml, configs/,
# and the trackers' folders, and is no run to continue or set aside)
_AFTER_A_STEP = ("metrics.jsonl", "samples", "generator_ema.safetensors", "generator_ema.json", "progress.gif",
                 "plots", "checkpoints", "eval.json")


def _own(path: Path) -> bool:
    """Whether distgan wrote ``path`` (a name of RESULTS): the right kind, and a folder holding only its entries."""
    if path.is_symlink():
        return False
    pattern = _OWN_ENTRIES.get(path.name)
    if path.name in ("wandb", "tensorboard", "configs", "samples", "plots", "checkpoints"):
        return path.is_dir() and (pattern is None or all(pattern.fullmatch(p.name) for p in path.iterdir()))
    return path.is_file()


def _has_content(path: Path) -> bool:
    return any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0


def existing_results(run_dir: Path) -> list[str]:
    """The names of RESULTS in ``run_dir`` that distgan wrote (a user's own folder of one of these names is not)."""
    return [name for name in RESULTS if (run_dir / name).exists() and _own(run_dir / name)]


def refuse_foreign(run_dir: Path) -> None:
    """Refuse a run dir where distgan would write into a file or folder it did not write."""
    foreign = [name for name in RESULTS if (run_dir / name).exists() and not _own(run_dir / name)]
    if foreign:
        raise ConfigError(f"run dir {run_dir}: {foreign[0]} there holds files distgan did not write (it writes its "
                          f"own {foreign[0]} there); choose another run.dir or move {run_dir / foreign[0]} away")


def completed_a_step(run_dir: Path) -> bool:
    """Whether a training in ``run_dir`` got past its start (a metrics line, a grid, a checkpoint, an export)."""
    return any(name in _AFTER_A_STEP and _has_content(run_dir / name) for name in existing_results(run_dir))


def refuse_overwrite(run_dir: Path) -> None:
    """A fresh start (no --resume) in a run dir that holds results is refused: nothing is overwritten. A start that
    crashed before its first step left none: its config.yaml is replaced and configs/ goes on."""
    refuse_foreign(run_dir)
    if completed_a_step(run_dir):
        raise ConfigError(
            f"run dir {run_dir} already holds a run ({', '.join(existing_results(run_dir))}): pass --resume auto to "
            "continue it, or choose another run.dir (nothing is overwritten)"
        )


def set_aside_results(run_dir: Path) -> Optional[Path]:
    """Move a run's earlier results into ``previous-<time>/`` (for a restart that has no checkpoint to resume).

    ``checkpoints/`` goes too: its checkpoints are all damaged, and left in place they would mix with the new
    branch's (keep-last-K would prune the new ones first, and the old best would stand).
    """
    refuse_foreign(run_dir)
    found = existing_results(run_dir)
    if not completed_a_step(run_dir):
        return None  # a start that crashed before step 1: nothing to keep apart
    aside = run_dir / time.strftime("previous-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for name in found:
        os.rename(run_dir / name, aside / name)
    return aside


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def meant_by_absent_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """What a config.yaml written before a key existed meant by leaving it out: the schema default, which keeps the
    earlier behaviour, except where the default changed it."""
    meant = flatten(json.loads(json.dumps(dataclasses.asdict(Config()))))
    generator = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith("generator.")}
    meant.update({f"generator.{k}": v for k, v in generator_keys_meant_when_absent(generator).items()})
    return meant


def _mapping(text: str) -> dict:
    """A saved config.yaml as a mapping (read like every YAML distgan reads: no aliases, no duplicate keys)."""
    try:
        data = load_yaml(text) or {}
    except (yaml.YAMLError, YAMLInputError, RecursionError) as err:
        raise ConfigError(f"a saved config.yaml of this run cannot be read ({shown(str(err))}); resume with "
                          "another checkpoint or start a new run.dir") from None
    if not isinstance(data, dict):
        raise ConfigError("a saved config.yaml of this run is not a mapping of sections; start a new run.dir")
    return data


def config_changes(before_yaml: str, after_yaml: str) -> tuple[list[str], list[str]]:
    """(refused, allowed) descriptions ``key: old -> new`` of the keys that differ between two configs; a key the
    saved config does not have (it predates the key) counts as what it meant then."""
    before, after = flatten(_mapping(before_yaml)), flatten(_mapping(after_yaml))
    before = {**{k: v for k, v in meant_by_absent_keys(before).items() if k in after}, **before}
    refused, allowed = [], []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, "(unset)"), after.get(key, "(unset)")
        if old == new:
            continue
        change = f"{key}: {old} -> {new}"
        ok = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)
        (allowed if ok else refused).append(change)
    return refused, allowed


def check_resume_config(saved_yaml: Optional[str], current_yaml: str, checkpoint: Path) -> None:
    """Refuse a resume whose config changes shapes or the meaning of the saved state; log other changes."""
    if saved_yaml is None:
        return
    refused, allowed = config_changes(saved_yaml, current_yaml)
    if refused:
        raise ConfigError(
            f"resuming {checkpoint} with a different config: {'; '.join(refused)}. These keys change the networks, "
            "the data stream or what the saved state means; resume with the run's config (its config.yaml) or start "
            "a new run.dir"
        )
    for change in allowed:
        log.info("resume changes %s", change)


WORKDIR_FILE = "workdir.txt"


def record_config(run_dir: Path, config_yaml: str, step: int, resumed: bool) -> Path:
    """config.yaml (the current config) and ``configs/NNNN-start|resume-step-S.yaml`` (every one so far); and, at
    the first start, WORKDIR_FILE: the folder the config's relative paths are relative to (eval --run reads it)."""
    if not (run_dir / WORKDIR_FILE).exists():
        (run_dir / WORKDIR_FILE).write_text(os.getcwd() + "\n")
    history = run_dir / "configs"
    history.mkdir(parents=True, exist_ok=True)
    number = len(list(history.glob("*.yaml"))) + 1
    kept = history / f"{number:04d}-{'resume' if resumed else 'start'}-step-{step:08d}.yaml"
    kept.write_text(config_yaml)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(config_yaml)
    os.replace(tmp, run_dir / "config.yaml")
    return kept


def claim_run_dir(lock: RunDirLock, resume: Optional[str], config_yaml: str) -> Optional[str]:
    """Lock the run dir and decide what to resume from (the main process only; the trainer shares the answer)."""
    lock.acquire()
    try:
        return _resume_decision(lock.path.parent, resume, config_yaml)
    except BaseException:
        lock.release()
        raise


def _resume_decision(run_dir: Path, resume: Optional[str], config_yaml: str) -> Optional[str]:
    path = find_resume_path(resume, run_dir)
    if resume is None:
        refuse_overwrite(run_dir)
    elif path is None:
        aside = set_aside_results(run_dir)
        if aside is not None:
            log.warning("--resume auto: no intact checkpoint in %s; its earlier results (damaged checkpoints "
                        "included) are kept in %s and training starts from step 0", run_dir, aside)
    else:
        saved = checkpoint_config(path)
        if saved is None and (path.parent.parent / "config.yaml").is_file():  # a version-1 checkpoint
            saved = (path.parent.parent / "config.yaml").read_text()
        check_resume_config(saved, config_yaml, path)
        aside = set_aside_newer(run_dir / "checkpoints", checkpoint_step(path))
        if aside is not None:
            if (run_dir / "metrics.jsonl").is_file():
                shutil.copy2(run_dir / "metrics.jsonl", aside / "metrics.jsonl")
            log.warning("resuming from %s: the checkpoints written after it (another branch of this run) and "
                        "its metrics.jsonl are kept in %s", path, aside)
    return str(path) if path is not None else None
