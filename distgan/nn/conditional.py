"""Class conditioning for any architecture: G sees a learned class embedding beside z; D has a projection head.

G (``ConditionalGenerator``): the architecture is built for a latent of ``2 * z_dim``; its input is z
concatenated with a learned embedding of the class (size z_dim). D (``ProjectionDiscriminator``, Miyato &
Koyama 2018): the architecture's last linear layer reads features h; the logit is ``linear(h) + <embed(y), h>``.
Both wrap the unconditional module, so every architecture, norm and loss works unchanged; a gradient penalty
differentiates D w.r.t. the images only (the labels are integers).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor, nn

from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: the wrapped generator applied to [z, embed(y)]."""

    def __init__(self, build: Callable[..., nn.Module], cfg: GeneratorConfig, resolution: int, channels: int,
                 num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes = cfg.z_dim, num_classes
        self.embed = nn.Embedding(num_classes, cfg.z_dim)
        self.net = build(dataclasses.replace(cfg, z_dim=2 * cfg.z_dim), resolution, channels)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.net(torch.cat([z, self.embed(y).to(z.dtype)], dim=1))


class ProjectionDiscriminator(nn.Module):
    """``D(x, y) = linear(h) + <embed(y), h>`` with h the features before the wrapped D's last linear layer."""

    def __init__(self, build: Callable[..., nn.Module], cfg: DiscriminatorConfig, resolution: int, channels: int,
                 num_classes: int) -> None:
        super().__init__()
        base = build(cfg, resolution, channels)
        layers = list(base.net)
        if len(layers) < 2 or not isinstance(layers[-2], nn.Linear) or layers[-2].out_features != 1:
            raise ConfigError(f"discriminator.conditional: arch '{cfg.arch}' has no final linear logit to project "
                              "onto; set discriminator.conditional=false or use arch dcgan or mlp")
        self.num_classes = num_classes
        self.features = nn.Sequential(*layers[:-2])
        self.linear = layers[-2]
        self.embed = nn.Embedding(num_classes, self.linear.in_features)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)  # starts near the unconditional D

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.features(x)
        return self.linear(h)[:, 0] + (self.embed(y).to(h.dtype) * h).sum(dim=1)
