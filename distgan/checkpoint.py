"""Checkpoints: atomic writes, integrity manifests, keep-last-K, newest-intact discovery, lineage, the best one.

Layout of one checkpoint (a folder, renamed into place only when complete):
    checkpoints/step-00001000/
        G.safetensors  D.safetensors  G_ema.safetensors   model weights and buffers
        optim.pt        optimizer + loss-scaler states (tensors and plain data: loads with weights_only=True)
        config.yaml     the config the run had when it wrote this checkpoint
        state.json      counters and a manifest (bytes and SHA-256 of every other file); written last
Everything is fsynced before the folder is renamed into place. Nothing here is unpickled beyond
torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distgan.data.untrusted import read_regular_file
from distgan.errors import UserError
from distgan.errors import shown as _shown
from distgan.output import Output, remove_stale_partials

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2 adds the manifest and config.yaml; version 1 checkpoints still load
STEP_FOLDER = re.compile(r"step-(\d{8})")  # exactly what save_checkpoint names; anything else is not ours


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from; the message names it and says why."""


@dataclass
class TrainState:
    """The counters a resumed run continues from."""

    step: int = 0  # generator steps completed
    images_seen: int = 0  # real images shown to D, global
    batches_consumed: int = 0  # per-rank real batches drawn from the data stream
    world_size: int = 1
    skipped_steps: int = 0  # phases skipped for non-finite losses or gradients (train.on_nonfinite=skip)
    overflow_steps: int = 0  # optimizer steps the fp16 loss scaler skipped after an overflow


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as independent contiguous CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone().cpu() for k, v in module.state_dict().items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_checkpoint(
    directory: Path,
    state: TrainState,
    modules: dict[str, torch.nn.Module],
    optim_state: dict,
    keep: int,
    config_yaml: str = "",
    metadata: Optional[dict[str, dict]] = None,
) -> Path:
    """Write ``directory/step-XXXXXXXX`` through distgan.output (temp sibling, fsync, lock, rename that replaces only
    an earlier checkpoint of the same step, partial removed on any error); keep the last ``keep``.
    ``metadata``: per module name, a JSON-able dict stored as the weights file's ``distgan`` metadata (a
    generator's export metadata, so the checkpoint's G_ema samples like an export)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{state.step:08d}"
    with Output(final, folder=True, check=_earlier_checkpoint, flag="checkpoint") as partial:
        _write_files(partial, state, modules, optim_state, config_yaml, metadata or {})
    _prune(directory, keep)
    return final


CHECKPOINT_FILES = {"G.safetensors", "D.safetensors", "G_ema.safetensors", "optim.pt", "config.yaml", "state.json"}


def _earlier_checkpoint(path: Path) -> None:
    """A re-run of a step replaces that step's checkpoint (complete or not), never a folder holding anything else."""
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a checkpoint folder; it was kept: move it away")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in CHECKPOINT_FILES)
    if foreign:
        raise CheckpointError(f"{path} holds {foreign[0]}, which is not a checkpoint's file; it was kept: move it "
                              "away, then resume")


def _write_files(folder: Path, state: TrainState, modules: dict[str, torch.nn.Module], optim_state: dict,
                 config_yaml: str, metadata: dict[str, dict]) -> None:
    for name, module in modules.items():
        meta = {"distgan": json.dumps(metadata[name])} if name in metadata else None
        save_file(module_tensors(module), str(folder / f"{name}.safetensors"), metadata=meta)
    torch.save(optim_state, folder / "optim.pt")
    if config_yaml:
        (folder / "config.yaml").write_text(config_yaml)
    manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(folder.iterdir())}
    (folder / "state.json").write_text(json.dumps(
        {"format_version": FORMAT_VERSION, **asdict(state), "manifest": manifest}, indent=2))
    for child in folder.iterdir():
        _fsync_file(child)
    fsync_dir(folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; remove temp folders whose writer (a pid on this host) is gone: distgan's
    marked partials, and the ``.tmp-step-N-PID`` folders of versions before distgan.output."""
    complete = list_checkpoints(directory)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_partials(directory)
    for stale in list(directory.glob(".tmp-step-*")) + list(directory.glob(".replaced-step-*")):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints written to completion (named step-XXXXXXXX, with state.json), oldest first.

    Completion is not integrity: ``verify_checkpoint`` checks the files against the manifest.
    """
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_FOLDER.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


# counters every checkpoint format has; the others (added later) mean 0 when absent
REQUIRED_COUNTERS = ("step", "images_seen", "batches_consumed", "world_size")
MAX_COUNTER = 2**63 - 1  # a counter is an int64 wherever it goes (torch, numpy seeds)
MAX_STATE_BYTES = 1 << 20  # state.json: a few counters and a manifest of a handful of files


def _read_state(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """state.json's content, or why it is not a checkpoint's: unreadable, an unknown format, a manifest that is not
    ``{file: {"bytes": int, "sha256": str}}``, or counters missing, unknown or not counts."""
    try:
        meta = json.loads(read_regular_file(path / "state.json", "state.json", MAX_STATE_BYTES))
    except (OSError, ValueError, RecursionError) as err:
        return None, f"state.json unreadable ({_shown(' '.join(str(err).split()))})"
    if not isinstance(meta, dict) or meta.get("format_version") not in (1, FORMAT_VERSION):
        return None, "state.json is not a distgan checkpoint of a known format"
    manifest = meta.get("manifest", {} if meta["format_version"] == 1 else None)
    if not isinstance(manifest, dict):
        return None, "state.json has no manifest of its files"
    for name, entry in manifest.items():
        if not (name and "/" not in name and "\\" not in name and name not in (".", "..")):
            return None, f"state.json's manifest names {_shown(name)}, which is not a file of the checkpoint"
        if not (isinstance(entry, dict) and _count(entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
            return None, f"state.json's manifest entry for {_shown(name)} is not {{\"bytes\": N, \"sha256\": \"...\"}}"
    counters = {k: v for k, v in meta.items() if k not in ("format_version", "manifest")}
    known = {f.name for f in fields(TrainState)}
    damage = [f"unknown key {_shown(k)}" for k in sorted(counters.keys() - known)]
    damage += [f"{k} missing" for k in REQUIRED_COUNTERS if k not in counters]
    damage += [f"{k} is {_shown(v)}, not a count" for k, v in counters.items() if k in known and not _count(v)]
    damage += [f"{k} is {_shown(v)}, past an int64" for k, v in counters.items() if _count(v) and v > MAX_COUNTER]
    if not damage and counters["world_size"] < 1:
        damage.append("world_size is 0")
    if not damage and STEP_FOLDER.fullmatch(path.name) and counters["step"] != checkpoint_step(path):
        damage.append(f"step is {_shown(counters['step'])} in a checkpoint named {path.name}")
    if damage:
        return None, f"state.json's counters are damaged ({'; '.join(damage)})"
    return meta, None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if the checkpoint is intact, else why not (a damaged state.json, a file missing, resized or changed)."""
    meta, problem = _read_state(path)
    if meta is None:
        return problem
    for name, expected in meta.get("manifest", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted on disk)"
    return None


def find_resume_path(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``auto``: the run's newest intact checkpoint (each newer damaged one is named in a warning), or None for
    a fresh start; else the given checkpoint (or the newest intact one in a given checkpoints/ folder)."""
    if resume is None:
        return None
    if resume == "auto":
        return _newest_intact(run_dir / "checkpoints", required=False)
    path = Path(resume)
    if path.is_dir() and not (path / "state.json").exists():
        return _newest_intact(path, required=True)
    if not (path / "state.json").is_file():
        raise CheckpointError(
            f"--resume {resume}: no checkpoint there (expected a folder with state.json, e.g. "
            f"{run_dir / 'checkpoints' / 'step-00001000'}); use --resume auto to pick the newest intact one"
        )
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"--resume {resume}: the checkpoint is damaged ({problem}); resume from an older one "
                              "or use --resume auto, which skips damaged checkpoints")
    return path


def _newest_intact(directory: Path, required: bool) -> Optional[Path]:
    for path in reversed(list_checkpoints(directory)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    if required:
        raise CheckpointError(f"--resume {directory}: no intact checkpoint in this folder")
    return None


def set_aside_newer(directory: Path, step: int) -> Optional[Path]:
    """Move checkpoints newer than ``step`` (another branch of the run) into ``abandoned-<time>/``: kept, named,
    and never again found by discovery."""
    newer = [p for p in list_checkpoints(directory) if checkpoint_step(p) > step]
    best = directory / "best"
    best_step = read_best_step(best)
    if best_step is not None and best_step > step:
        newer.append(best)
    if not newer:
        return None
    aside = directory / time.strftime("abandoned-%Y%m%d-%H%M%S", time.gmtime())
    aside.mkdir()
    for path in newer:
        os.rename(path, aside / path.name)
    fsync_dir(directory)
    return aside


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> tuple[TrainState, dict]:
    """Load weights into ``modules`` (strict) and return the counters and the optimizer state."""
    meta, problem = _read_state(path)
    if meta is None:
        raise CheckpointError(f"{path}: the checkpoint is damaged ({problem}); resume from an older one or use "
                              "--resume auto, which skips damaged checkpoints")
    meta.pop("format_version")
    meta.pop("manifest", None)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(
                f"{file} is missing: the checkpoint has no {name}" + (" (EMA was off when it was written: resume "
                                                                      "with ema.enabled=false)" if name == "G_ema" else ""))
        try:
            tensors = load_file(str(file))
        except SafetensorError as err:
            raise CheckpointError(f"{file}: unreadable ({err}); resume from an older checkpoint") from None
        try:
            missing, unexpected = module.load_state_dict(tensors, strict=False)
        except RuntimeError as err:  # a tensor of another shape: the checkpoint is of another network
            first = _shown(" ".join(str(err).split())[-160:])
            raise CheckpointError(f"{file} does not fit the model built from the config ({first}): resume with the "
                                  f"config the run was started with ({path}/config.yaml)") from None
        if missing or unexpected:
            raise CheckpointError(
                f"{file} does not fit the model built from the config (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}): resume with the config the run was started with ({path}/config.yaml)"
            )
    try:
        optim_state = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path / 'optim.pt'}: unreadable ({_shown(' '.join(str(err).split()))}); resume from an "
                              "older checkpoint") from None
    return TrainState(**meta), optim_state


def checkpoint_config(path: Path) -> Optional[str]:
    """The config.yaml saved in a checkpoint (None for a version-1 checkpoint, which has none)."""
    file = path / "config.yaml"
    return file.read_text() if file.is_file() else None


def save_best(run_dir: Path, state: TrainState, modules: dict[str, torch.nn.Module], best: dict,
              metadata: Optional[dict[str, dict]] = None) -> Path:
    """``checkpoints/best/step-N`` (weights only) and ``best.json``: the best evaluation so far."""
    path = save_checkpoint(run_dir / "checkpoints" / "best", state, modules, {}, keep=1, metadata=metadata)
    tmp = run_dir / "checkpoints" / "best" / "best.json.tmp"
    tmp.write_text(json.dumps({**best, "checkpoint": path.name}, indent=2))
    os.replace(tmp, tmp.with_suffix(""))
    return path


def read_best(run_dir: Path) -> Optional[dict]:
    """best.json, or None when there is none or it cannot be read (the best is then found again)."""
    path = run_dir / "checkpoints" / "best" / "best.json"
    try:
        best = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        log.warning("%s is unreadable; the best checkpoint will be chosen anew", path)
        return None
    if best is not None and not _is_best_record(best):
        log.warning("%s is not a best-checkpoint record; the best checkpoint will be chosen anew", path)
        return None
    return best


def _is_best_record(best: Any) -> bool:
    """A dict with a metric name, an integer step and a numeric value (bool is not a number here)."""
    if not isinstance(best, dict):
        return False
    value = best.get("value")
    return (isinstance(best.get("metric"), str) and type(best.get("step")) is int
            and isinstance(value, (int, float)) and not isinstance(value, bool))


def read_best_step(best_dir: Path) -> Optional[int]:
    best = read_best(best_dir.parent.parent)
    return int(best["step"]) if best else None
