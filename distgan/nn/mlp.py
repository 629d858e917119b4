"""Fully connected models: the MLP generator and discriminator, and the 2014 GAN paper's maxout discriminator.

They work at any resolution and channel count (the image is flattened). Hidden layers are normalised
when a norm is configured, except D's first layer (as in the DCGAN models); linear layers keep PyTorch's
default initialisation. With the seed recipe (z 100, G hidden [128, 256, 512], D hidden [512, 256],
28x28x1) the layers are 100->128->256->512->784 and 784->512->256->1.
"""
from __future__ import annotations

from einops import reduce
from torch import Tensor, nn

from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig
from distgan.nn.layers import (
    Flatten, Squeeze, Unflatten, activation, apply_spectral_norm, block,
    has_norm_layer,
)
from distgan.nn.registry import DISCRIMINATORS, GENERATORS, architecture


@architecture(GENERATORS, "mlp")
class MLPGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, resolution: int, channels: int) -> None:
        super().__init__()
        self.z_dim = cfg.z_dim
        sizes = [cfg.z_dim, *cfg.hidden]
        bias = not has_norm_layer(cfg.norm)
        layers: list[nn.Module] = []
        for f_in, f_out in zip(sizes[:-1], sizes[1:]):
            layers += block(nn.Linear(f_in, f_out, bias=bias), cfg.norm, f_out, False, activation(cfg.leaky_slope))
        layers += [nn.Linear(sizes[-1], channels * resolution * resolution), nn.Tanh(), Unflatten(channels, resolution, resolution)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


@architecture(DISCRIMINATORS, "mlp")
class MLPDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig, resolution: int, channels: int) -> None:
        super().__init__()
        sizes = [channels * resolution * resolution, *cfg.hidden]
        layers: list[nn.Module] = [Flatten()]
        for i, (f_in, f_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            norm = cfg.norm if i > 0 else "none"
            layer, activation = self.hidden_layer(cfg, f_in, f_out, norm)
            layers += block(layer, norm, f_out, False, activation, cfg.dropout)
        layers += [nn.Linear(sizes[-1], 1), Squeeze()]
        self.net = nn.Sequential(*layers)
        if cfg.norm == "spectral":
            apply_spectral_norm(self)

    def hidden_layer(self, cfg: DiscriminatorConfig, f_in: int, f_out: int, norm: str) -> tuple[nn.Module, nn.Module]:
        return nn.Linear(f_in, f_out, bias=not has_norm_layer(norm)), nn.LeakyReLU(cfg.leaky_slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Maxout(nn.Module):
    """``pieces`` linear maps per unit; each unit outputs their maximum (Goodfellow et al. 2013)."""

    def __init__(self, in_features: int, out_features: int, pieces: int) -> None:
        super().__init__()
        if pieces < 1:
            raise ConfigError(f"config key 'discriminator.maxout_pieces' = {pieces}: must be at least 1")
        self.pieces = pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: Tensor) -> Tensor:
        return reduce(self.linear(x), "b (o k) -> b o", "max", k=self.pieces)


@architecture(DISCRIMINATORS, "maxout")  # the 2014 paper's maxout MLP
class MaxoutDiscriminator(MLPDiscriminator):
    """The maxout MLP discriminator of the GAN paper (Goodfellow et al. 2014): maxout layers with dropout."""

    def hidden_layer(self, cfg: DiscriminatorConfig, f_in: int, f_out: int, norm: str) -> tuple[nn.Module, nn.Module]:
        return Maxout(f_in, f_out, cfg.maxout_pieces), nn.Identity()