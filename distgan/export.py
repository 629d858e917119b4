"""The exported generator: ``generator_ema.safetensors`` plus ``generator_ema.json``, all that sampling needs.

The weights file carries its metadata (the generator's config section, resolution, channels, classes), so
``distgan.sample`` and ``distgan.eval`` rebuild the network without the run's config or checkpoints.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from distgan.checkpoint import module_tensors
from distgan.config import GeneratorConfig, section_from_dict
from distgan.nn import build_generator

EXPORT_VERSION = 1


def export_generator(path: Path, model: torch.nn.Module, generator_cfg: GeneratorConfig, resolution: int,
                     channels: int, classes: Optional[list[str]], step: int, ema: bool) -> Path:
    """Write the weights (metadata inside) atomically, then the readable ``.json`` beside them."""
    meta = {"format_version": EXPORT_VERSION, "generator": asdict(generator_cfg), "resolution": resolution,
            "channels": channels, "classes": classes, "step": step, "ema": ema}
    tmp = path.with_name(path.name + ".tmp")
    save_file(module_tensors(model), str(tmp), metadata={"distgan": json.dumps(meta)})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def load_generator_export(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild an exported generator (eval mode) and return it with its metadata."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported generator there (a finished run writes generator_ema.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("distgan")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); re-export it or point at another") from err
    if raw is None:
        raise ValueError(f"{path}: not a distgan export (no 'distgan' metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != EXPORT_VERSION:
        raise ValueError(f"{path}: export format {meta.get('format_version')} is not {EXPORT_VERSION}")
    model = build_generator(section_from_dict(GeneratorConfig, meta["generator"], "generator"), meta["resolution"],
                            meta["channels"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval(), meta
