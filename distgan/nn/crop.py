"""The inverse of ``data.pad``: a generator trained on padded images, seen at the data's resolution.

A run with ``data.pad=P`` trains G and D on real images with P background pixels added on each side, so G makes
images 2P pixels larger than the data. Whatever scores or shows G's images against the data (evaluation, sample
grids, the GIF, ``distgan.sample``, ``distgan.eval`` on an export) sees them through :func:`cropped`: the centre,
at the data's resolution, so the figures compare with unpadded runs and the feature classifier gets the size it
was trained on.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def center_crop(images: Tensor, pad: int) -> Tensor:
    """``images`` [B, C, R, R] without ``pad`` pixels on each side: [B, C, R - 2 pad, R - 2 pad]."""
    return images[..., pad:images.shape[-2] - pad, pad:images.shape[-1] - pad] if pad else images


class CenterCrop(nn.Module):
    """A generator whose images are center-cropped by ``pad`` pixels on each side; holds no parameters of its own
    (the generator's state_dict, saved and exported, is the inner one's)."""

    def __init__(self, generator: nn.Module, pad: int) -> None:
        super().__init__()
        self.generator, self.pad = generator, pad
        self.z_dim = generator.z_dim

    def forward(self, z: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return center_crop(self.generator(z, *args, **kwargs), self.pad)


def cropped(generator: nn.Module, pad: int) -> nn.Module:
    """``generator`` as it is shown and scored: cropped by ``pad`` (``data.pad``, or an export's ``pad``) on each
    side; the generator itself when ``pad`` is 0."""
    return CenterCrop(generator, pad) if pad else generator
