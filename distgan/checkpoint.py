"""Checkpoints: atomic writes, keep-last-K, latest discovery, resume, and the best checkpoint by a metric.

Layout of one checkpoint (a folder, renamed into place only when complete):
    checkpoints/step-00001000/
        G.safetensors  D.safetensors  G_ema.safetensors   model weights and buffers
        optim.pt        optimizer + loss-scaler states (tensors and plain data: loads with weights_only=True)
        state.json      counters; written last, so its presence marks a complete checkpoint
Nothing here is unpickled beyond torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class TrainState:
    """The counters a resumed run continues from."""

    step: int = 0  # generator steps completed
    images_seen: int = 0  # real images shown to D, global
    batches_consumed: int = 0  # per-rank real batches drawn from the data stream
    world_size: int = 1
    skipped_steps: int = 0  # phases skipped for non-finite losses or gradients (train.on_nonfinite=skip)
    overflow_steps: int = 0  # optimizer steps the fp16 loss scaler skipped after an overflow


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as independent contiguous CPU copies (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().clone().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    directory: Path,
    state: TrainState,
    modules: dict[str, torch.nn.Module],
    optim_state: dict,
    keep: int,
) -> Path:
    """Write ``directory/step-XXXXXXXX`` atomically (temp folder, fsync, rename); keep the last ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{state.step:08d}"
    tmp = directory / f".tmp-step-{state.step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(module_tensors(module), str(tmp / f"{name}.safetensors"))
    torch.save(optim_state, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **asdict(state)}, indent=2))
    for child in tmp.iterdir():
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(directory)
    _prune(directory, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    complete = list_checkpoints(directory)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".tmp-step-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (those with state.json), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_path(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``auto``: the run's latest complete checkpoint, or None for a fresh start; else the given path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and path.name == "checkpoints":
        found = list_checkpoints(path)
        path = found[-1] if found else path
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"--resume {resume}: no complete checkpoint there (expected a folder with state.json, "
            f"e.g. {run_dir / 'checkpoints' / 'step-00001000'}); use --resume auto to pick the latest"
        )
    return path


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> tuple[TrainState, dict]:
    """Load weights into ``modules`` (strict) and return the counters and the optimizer state."""
    meta = json.loads((path / "state.json").read_text())
    if meta.pop("format_version", None) != FORMAT_VERSION:
        raise ValueError(f"{path}/state.json: unknown checkpoint format (expected version {FORMAT_VERSION})")
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: the checkpoint {path} is incomplete")
        tensors = load_file(str(file))
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{file} does not fit the model built from the config (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}): resume with the config the run was started with ({path.parent.parent}/config.yaml)"
            )
    optim_state = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    return TrainState(**meta), optim_state


def save_best(run_dir: Path, state: TrainState, modules: dict[str, torch.nn.Module], best: dict) -> Path:
    """``checkpoints/best/step-N`` (weights only) and ``best.json``: the best evaluation so far."""
    path = save_checkpoint(run_dir / "checkpoints" / "best", state, modules, {}, keep=1)
    tmp = run_dir / "checkpoints" / "best" / "best.json.tmp"
    tmp.write_text(json.dumps({**best, "checkpoint": path.name}, indent=2))
    os.replace(tmp, tmp.with_suffix(""))
    return path


def read_best(run_dir: Path) -> Optional[dict]:
    path = run_dir / "checkpoints" / "best" / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None
