"""DCGAN generator and discriminator (Radford et al. 2015) for 28, 32, 64 and 128 pixel images.

G projects z to a 4x4 map (7x7 for 28 px), then doubles the resolution with stride-2 transposed convs
(kernel 4) while halving the channels down to ``width``; the last one outputs the image channels, tanh.
``generator.upsample`` nearest or bilinear replaces each transposed conv by a resize then a 3x3 conv (Odena
et al. 2016, "Deconvolution and checkerboard artifacts"); the default keeps the DCGAN layers and state dict.
D mirrors it with stride-2 convs and LeakyReLU, then one linear logit. As in the paper, D's first layer
and G's output layer are not normalised. With the defaults (width 64, max_width 512, batch norm) at
64 px, the layer shapes are those of the PyTorch DCGAN example.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig
from distgan.nn.layers import (
    Flatten, Squeeze, Unflatten, activation, apply_spectral_norm, block,
    dcgan_init_, has_norm_layer, norm_layer,
)
from distgan.nn.registry import DISCRIMINATORS, GENERATORS, architecture

BASE_SIZE = {28: 7, 32: 4, 64: 4, 128: 4}  # resolution -> size of the smallest feature map
RESOLUTIONS = tuple(BASE_SIZE)


def _num_blocks(resolution: int, who: str) -> int:
    if resolution not in BASE_SIZE:
        raise ConfigError(
            f"{who}: arch 'dcgan' does not support resolution {resolution}; supported: "
            f"{', '.join(map(str, RESOLUTIONS))} (use arch 'mlp', or resize the data to one of these)"
        )
    return int(math.log2(resolution // BASE_SIZE[resolution]))


def _upsampling(kind: str, c_in: int, c_out: int, bias: bool) -> nn.Module:
    """One doubling of the resolution: a stride-2 transposed conv (DCGAN), or resize then a 3x3 conv."""
    if kind == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)
    resize = nn.Upsample(scale_factor=2, mode=kind, **({"align_corners": False} if kind == "bilinear" else {}))
    return nn.Sequential(resize, nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias))


def _channels(width: int, max_width: int, blocks: int) -> list[int]:
    """Channels of the feature maps from the smallest (deepest) to the largest: w*2^(n-1) ... w, capped."""
    return [min(width * 2**k, max_width) for k in reversed(range(blocks))]


@architecture(GENERATORS, "dcgan", lambda r: r in BASE_SIZE, ", ".join(map(str, BASE_SIZE)))
class DCGANGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, resolution: int, channels: int) -> None:
        super().__init__()
        blocks = _num_blocks(resolution, "generator")
        base = BASE_SIZE[resolution]
        widths = _channels(cfg.width, cfg.max_width, blocks)
        bias = not has_norm_layer(cfg.norm)
        self.z_dim = cfg.z_dim
        # "Project and reshape": a linear map of z to the smallest feature map, normalised per channel.
        layers: list[nn.Module] = [nn.Linear(cfg.z_dim, widths[0] * base * base, bias=bias), Unflatten(widths[0], base, base)]
        norm = norm_layer(cfg.norm, widths[0], spatial=True)
        if norm is not None:
            layers.append(norm)
        layers.append(activation(cfg.leaky_slope))
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = _upsampling(cfg.upsample, c_in, c_out, bias)
            layers += block(conv, cfg.norm, c_out, spatial=True, act=activation(cfg.leaky_slope))
        layers += [_upsampling(cfg.upsample, widths[-1], channels, True), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


@architecture(DISCRIMINATORS, "dcgan", lambda r: r in BASE_SIZE, ", ".join(map(str, BASE_SIZE)))
class DCGANDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, resolution: int, channels: int) -> None:
        super().__init__()
        blocks = _num_blocks(resolution, "discriminator")
        base = BASE_SIZE[resolution]
        widths = list(reversed(_channels(cfg.width, cfg.max_width, blocks)))
        slope = cfg.leaky_slope
        layers: list[nn.Module] = block(  # no norm on the first layer (DCGAN paper)
            nn.Conv2d(channels, widths[0], 4, stride=2, padding=1), "none", widths[0], True, nn.LeakyReLU(slope), cfg.dropout
        )
        bias = not has_norm_layer(cfg.norm)
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)
            layers += block(conv, cfg.norm, c_out, True, nn.LeakyReLU(slope), cfg.dropout)
        layers += [Flatten(), nn.Linear(widths[-1] * base * base, 1), Squeeze()]
        self.net = nn.Sequential(*layers)
        dcgan_init_(self)
        if cfg.norm == "spectral":
            apply_spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
