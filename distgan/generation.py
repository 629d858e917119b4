"""Images from a generator: latents (with the truncation trick), batched generation, class choice, slerp.

Library code shared by ``distgan.sample``, the Python API (:func:`distgan.generate`) and evaluation: the same
seed gives the same images whichever of them asks.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from distgan import console
from distgan.errors import UserError
from distgan.nn import sample_latent


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation (Gaussian latents keep their norm along the path)."""
    a_n, b_n = a / a.norm(), b / b.norm()
    omega = torch.acos((a_n * b_n).sum().clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so)[:, None] * a + (torch.sin(t * omega) / so)[:, None] * b


def truncate(z: Tensor, value: float, mode: str, gen: torch.Generator, flag: str = "--truncation") -> Tensor:
    """The truncation trick on normal latents: fidelity for variety. ``resample``: redraw every entry whose
    magnitude exceeds ``value`` (Brock et al. 2019); ``scale``: shrink z towards the mean by ``value``."""
    if mode == "scale":
        if not 0 < value <= 1:
            raise UserError(f"{flag} {value} with truncation mode scale: must be in (0, 1]")
        return z * value
    if mode != "resample":
        raise UserError(f"truncation mode {mode!r}: use 'resample' or 'scale'")
    if not value > 0:
        raise UserError(f"{flag} {value}: must be positive (entries above it are drawn again)")
    z = z.clone()
    outside = z.abs() > value
    while outside.any():  # each redraw lands inside with probability P(|N(0,1)| <= value) > 0
        z[outside] = torch.randn(int(outside.sum()), generator=gen)
        outside = z.abs() > value
    return z


LATENT_BLOCK = 1 << 16  # latents are drawn this many at a time: a stream of any length holds one block


def latent_blocks(n: int, z_dim: int, z_dist: str, seed: int, truncation: Optional[float] = None,
                  mode: str = "resample") -> Iterator[Tensor]:
    """The latents of :func:`latents`, LATENT_BLOCK at a time, drawn as they are consumed."""
    if truncation is not None and z_dist != "normal":
        raise UserError(f"--truncation: the generator draws {z_dist} latents; truncation is for normal ones")
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, LATENT_BLOCK):
        z = sample_latent(min(LATENT_BLOCK, n - start), z_dim, z_dist, gen)
        yield z if truncation is None else truncate(z, truncation, mode, gen)


def latents(n: int, z_dim: int, z_dist: str, seed: int, truncation: Optional[float] = None,
            mode: str = "resample") -> Tensor:
    """``n`` latent vectors drawn from ``seed`` on the CPU (the same numbers on any device), truncated if asked."""
    blocks = list(latent_blocks(n, z_dim, z_dist, seed, truncation, mode))
    if not blocks:
        return sample_latent(0, z_dim, z_dist)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def class_index(value: Union[str, int], classes: Sequence[str], flag: str = "class") -> int:
    """A class given as its name or as an index into ``classes`` (``flag``: what an error calls it)."""
    text = str(value)
    if text in classes:
        return list(classes).index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise UserError(f"{flag} {value}: not a class of this generator; use a name or an index 0..{len(classes) - 1} "
                    f"({', '.join(classes)})")


def batches(model: nn.Module, z: Tensor, labels: Optional[Tensor], batch: int) -> Iterator[Tensor]:
    """``model``'s float images for ``z`` (and ``labels``), ``batch`` at a time, on the model's device."""
    if batch < 1:
        raise UserError(f"batch {batch}: must be at least 1")
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        for i in console.batches(len(z), batch, "generating"):
            zi = z[i:i + batch].to(device)
            yield (model(zi) if labels is None else model(zi, labels[i:i + batch].to(device))).float()


def generate(model: nn.Module, n: int, z_dim: int, z_dist: str, seed: int, batch: int,
             truncation: Optional[float] = None, mode: str = "resample",
             labels: Optional[Tensor] = None) -> Tensor:
    """``n`` images in [-1, 1] (of the classes ``labels`` [n] for a conditional generator), on the CPU."""
    z = latents(n, z_dim, z_dist, seed, truncation, mode)
    return torch.cat([images.cpu() for images in batches(model, z, labels, batch)])


def to_uint8(images: Tensor) -> np.ndarray:
    """Images in [-1, 1] [N, C, H, W] as uint8 pixels [N, H, W, C] (what PNG files and arrays hold)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
