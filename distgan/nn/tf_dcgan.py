"""The TensorFlow DCGAN tutorial's models (tensorflow.org/tutorials/generative/dcgan), in PyTorch.

G: Dense(z -> R/4*R/4*4w, no bias), BN, LeakyReLU, reshape, ConvT(4w->2w, 5, s1), BN, LeakyReLU,
ConvT(2w->w, 5, s2), BN, LeakyReLU, ConvT(w->C, 5, s2), tanh. D: Conv(C->w, 5, s2), LeakyReLU, dropout,
Conv(w->2w, 5, s2), LeakyReLU, dropout, flatten, Dense -> 1. With width 64 the channels are the
tutorial's (256, 128, 64 and 64, 128). 'same' padding is padding 2 (and output_padding 1 for the
stride-2 transposed convs), so 7 -> 14 -> 28 exactly. Keras' default initialisation (glorot uniform,
zero bias) and LeakyReLU slope (0.3, used when generator.leaky_slope is 0) are kept; BatchNorm uses
PyTorch's eps and momentum.
"""
from __future__ import annotations

from torch import Tensor, nn

from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig
from distgan.nn.layers import (
    Flatten, Squeeze, Unflatten, apply_spectral_norm, block, glorot_init_,
    has_norm_layer,
)
from distgan.nn.registry import DISCRIMINATORS, GENERATORS, architecture

KERAS_LEAKY_SLOPE = 0.3


def _base(resolution: int, who: str) -> int:
    if resolution % 4 != 0 or resolution < 4:
        raise ConfigError(
            f"{who}: arch 'tf_dcgan' needs a resolution divisible by 4 (two stride-2 layers), got {resolution}"
        )
    return resolution // 4


@architecture(GENERATORS, "tf_dcgan", lambda r: r >= 4 and r % 4 == 0, "multiples of 4")
class TFDCGANGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, resolution: int, channels: int) -> None:
        super().__init__()
        base = _base(resolution, "generator")
        w = cfg.width
        slope = cfg.leaky_slope if cfg.leaky_slope > 0 else KERAS_LEAKY_SLOPE
        bias = not has_norm_layer(cfg.norm)
        self.z_dim = cfg.z_dim
        features = base * base * 4 * w
        layers: list[nn.Module] = block(nn.Linear(cfg.z_dim, features, bias=False), cfg.norm, features, False, nn.LeakyReLU(slope))
        layers.append(Unflatten(4 * w, base, base))
        layers += block(nn.ConvTranspose2d(4 * w, 2 * w, 5, stride=1, padding=2, bias=bias), cfg.norm, 2 * w, True, nn.LeakyReLU(slope))
        layers += block(
            nn.ConvTranspose2d(2 * w, w, 5, stride=2, padding=2, output_padding=1, bias=bias),
            cfg.norm, w, True, nn.LeakyReLU(slope),
        )
        layers += [nn.ConvTranspose2d(w, channels, 5, stride=2, padding=2, output_padding=1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        glorot_init_(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


@architecture(DISCRIMINATORS, "tf_dcgan", lambda r: r >= 4 and r % 4 == 0, "multiples of 4")
class TFDCGANDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, resolution: int, channels: int) -> None:
        super().__init__()
        base = _base(resolution, "discriminator")
        w = cfg.width
        layers: list[nn.Module] = block(
            nn.Conv2d(channels, w, 5, stride=2, padding=2), "none", w, True, nn.LeakyReLU(cfg.leaky_slope), cfg.dropout
        )
        conv = nn.Conv2d(w, 2 * w, 5, stride=2, padding=2, bias=not has_norm_layer(cfg.norm))
        layers += block(conv, cfg.norm, 2 * w, True, nn.LeakyReLU(cfg.leaky_slope), cfg.dropout)
        layers += [Flatten(), nn.Linear(2 * w * base * base, 1), Squeeze()]
        self.net = nn.Sequential(*layers)
        glorot_init_(self)
        if cfg.norm == "spectral":
            apply_spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
