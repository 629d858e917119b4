"""Any trained generator, loaded in one call: a run dir, an export file, or a checkpoint folder.

``load_generator("runs/x")`` gives the run's newest generator: its final export, or (a run stopped by a signal,
a STOP file or a preemption) the G_ema of its newest intact checkpoint; ``step=N`` picks a checkpoint. Every
checkpoint's G/G_ema file carries the export's metadata, so each rebuilds without the run's config or data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from distgan.checkpoint import checkpoint_step, find_resume_path, list_checkpoints, verify_checkpoint
from distgan.errors import UserError
from distgan.export import EXPORT_FILE, ExportError, load_generator_export, read_export_metadata
from distgan.generation import class_index, generate as generate_images, to_uint8
from distgan.objective import call

PathLike = Union[str, Path]


def _checkpoint_file(folder: Path) -> Path:
    """The generator file of a checkpoint folder (G_ema, or G when EMA was off), after an integrity check."""
    problem = verify_checkpoint(folder)
    if problem:
        raise ExportError(f"{folder}: the checkpoint is damaged ({problem}); pick another one (--step N)")
    for name in ("G_ema", "G"):
        if (folder / f"{name}.safetensors").is_file():
            return folder / f"{name}.safetensors"
    raise ExportError(f"{folder}: the checkpoint holds no generator (G_ema.safetensors or G.safetensors)")


def generator_file(source: PathLike, step: Optional[int] = None) -> Path:
    """The weights file ``source`` names: itself (an export or a checkpoint's G_ema file); a checkpoint folder's
    G_ema; a run dir's checkpoint of ``step``, else its newest generator (the export, or a newer intact
    checkpoint's G_ema)."""
    path = Path(source)
    if step is not None and not path.is_dir():
        raise UserError(f"step {step} goes with a run dir; {path} is not one")
    if path.exists() and not path.is_dir():  # not is_file(): a FIFO or a device is refused by name when read
        return path
    if not path.is_dir():
        raise ExportError(f"{path}: no such file or folder; give a run dir, an export (.safetensors) or a checkpoint "
                          "folder")
    if (path / "state.json").is_file():
        return _checkpoint_file(path)
    checkpoints = list_checkpoints(path / "checkpoints")
    if step is not None:
        chosen = [c for c in checkpoints if checkpoint_step(c) == step]
        if not chosen:
            steps = ", ".join(str(checkpoint_step(c)) for c in checkpoints) or "none"
            raise ExportError(f"{path}: no checkpoint of step {step} (it has: {steps}; a run keeps its last "
                              "checkpoint.keep checkpoints)")
        return _checkpoint_file(chosen[0])
    export = path / EXPORT_FILE
    newest = find_resume_path("auto", path)  # the newest intact checkpoint (damaged ones are skipped, named)
    if export.is_file() and (newest is None or read_export_metadata(export).get("step", 0) >= checkpoint_step(newest)):
        return export
    if newest is not None:
        return _checkpoint_file(newest)
    raise ExportError(f"{path}: no exported generator ({EXPORT_FILE}) and no intact checkpoint: not a run dir of "
                      "distgan.train, or the run stopped before its first checkpoint")


class Generator(nn.Module):
    """A trained generator, ready to sample: eval mode, on ``device``; ``G(z)`` or ``G(z, y)`` gives images in
    [-1, 1] at the data's resolution. Knows its ``z_dim``, ``z_dist``, ``classes`` (None unless
    class-conditional), ``resolution``, ``channels``, ``step`` and the file it came from (``source``)."""

    def __init__(self, net: nn.Module, meta: dict, source: Path) -> None:
        super().__init__()
        self.net, self.meta, self.source = net, meta, source
        g = meta["generator"]
        self.z_dim, self.z_dist = int(g["z_dim"]), str(g["z_dist"])
        self.classes: Optional[list[str]] = list(meta["classes"]) if g.get("conditional") else None
        self.resolution = meta["resolution"] - 2 * meta.get("pad", 0)  # as shown: a padded run's crop
        self.channels, self.step = meta["channels"], meta.get("step")
        self.eval()

    def forward(self, z: Tensor, y: Optional[Tensor] = None) -> Tensor:
        return call(self.net, z, y)

    def labels(self, n: int, classes: Union[None, int, str, Sequence[Union[int, str]]] = None) -> Optional[Tensor]:
        """Class indices for ``n`` images: one class (name or index) for all, one per image, or (None) every class
        in turn; None for an unconditional generator (which refuses a class)."""
        if self.classes is None:
            if classes is not None:
                raise UserError("classes: this generator is not class-conditional; sample it without classes")
            return None
        if classes is None:
            return torch.arange(n) % len(self.classes)
        if isinstance(classes, (int, str)):
            return torch.full((n,), class_index(classes, self.classes))
        if len(classes) != n:
            raise UserError(f"classes: {len(classes)} given for {n} images; give one class, one per image, or none")
        return torch.tensor([class_index(c, self.classes) for c in classes])

    def generate(self, n: int, seed: int = 0, classes: Union[None, int, str, Sequence[Union[int, str]]] = None,
                 truncation: Optional[float] = None, truncation_mode: str = "resample", batch: int = 256,
                 output: str = "uint8") -> Union[np.ndarray, Tensor]:
        """``n`` images from latents drawn from ``seed``: uint8 pixels [n, H, W, C] (``output="uint8"``) or a float
        tensor in [-1, 1] [n, C, H, W] (``output="tensor"``); the same seed gives the images distgan.sample writes."""
        if output not in ("uint8", "tensor"):
            raise UserError(f"output={output!r}: use 'uint8' (numpy pixels) or 'tensor' (floats in [-1, 1])")
        if n < 1:
            raise UserError(f"n={n}: must be at least 1")
        images = generate_images(self, n, self.z_dim, self.z_dist, seed, batch, truncation, truncation_mode,
                                 self.labels(n, classes))
        return images if output == "tensor" else to_uint8(images)


def load_generator(source: PathLike, step: Optional[int] = None, device: Union[str, torch.device] = "cpu") -> Generator:
    """The generator ``source`` names (a run dir, an export file or a checkpoint folder; ``step``: a run's
    checkpoint of that step), rebuilt from its metadata and loaded on ``device`` in eval mode."""
    path = generator_file(source, step)
    net, meta = load_generator_export(path, device)
    return Generator(net, meta, path).to(device)


def generate(generator: Generator, n: int, seed: int = 0, **options) -> Union[np.ndarray, Tensor]:
    """``generator.generate(n, seed, ...)``: see :meth:`Generator.generate`."""
    return generator.generate(n, seed, **options)
