"""Class conditioning for any architecture: G sees a learned class embedding beside z; D has a projection head.

G (``ConditionalGenerator``), ``generator.conditioning``: ``norm`` (default) gives every normalisation layer of the
architecture a per-class gain and shift (conditional batch norm: Dumoulin et al. 2017, de Vries et al. 2017, as in
Miyato & Koyama 2018 and BigGAN), so z stays G's only input; ``concat`` builds the architecture for a latent of
``2 * z_dim`` and feeds z concatenated with a learned class embedding (size z_dim), the cGAN of Mirza & Osindero
2014, which on Fashion-MNIST lets G ignore z within a class (see BENCHMARKS.md). D (``ProjectionDiscriminator``, Miyato &
Koyama 2018): the architecture's last linear layer reads features h; the logit is ``linear(h) + <embed(y), h>``.
Both wrap the unconditional module, so every architecture, norm and loss works unchanged; a gradient penalty
differentiates D w.r.t. the images only (the labels are integers).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig


NORM_LAYERS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)  # distgan's SyncBatchNorm is a _BatchNorm


class ClassNorm(nn.Module):
    """A normalisation layer followed by a per-class gain and shift: ``norm(x) * (1 + gain[y]) + shift[y]``.

    Both start at zero, so the layer starts as the plain one; the wrapped layer keeps its own affine parameters.
    """

    def __init__(self, norm: nn.Module, num_classes: int) -> None:
        super().__init__()
        features = _features_of(norm)
        self.norm = norm
        self.gain = nn.Embedding(num_classes, features)
        self.shift = nn.Embedding(num_classes, features)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.norm(x)
        spatial = (1,) * (h.dim() - 2)  # [B, C] broadcast over the spatial dimensions (no batch size: ONNX export)
        gain = self.gain(y).to(h.dtype).unflatten(-1, (-1, *spatial))
        shift = self.shift(y).to(h.dtype).unflatten(-1, (-1, *spatial))
        return h * (1 + gain) + shift


def _features_of(norm: nn.Module) -> int:
    if isinstance(norm, _BatchNorm):
        return norm.num_features
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    return int(norm.normalized_shape[-1])


class ConditionalGenerator(nn.Module):
    """``G(z, y)``: conditional normalisation layers (``norm``) or the wrapped generator applied to [z, embed(y)]
    (``concat``)."""

    def __init__(self, build: Callable[..., nn.Module], cfg: GeneratorConfig, resolution: int, channels: int,
                 num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes, self.conditioning = cfg.z_dim, num_classes, cfg.conditioning
        if cfg.conditioning == "concat":
            self.embed = nn.Embedding(num_classes, cfg.z_dim)
            self.net = build(dataclasses.replace(cfg, z_dim=2 * cfg.z_dim), resolution, channels)
            return
        self.net = build(cfg, resolution, channels)
        layers = getattr(self.net, "net", None)
        norms = [i for i, layer in enumerate(layers or ()) if isinstance(layer, NORM_LAYERS)]
        if not isinstance(layers, nn.Sequential) or not norms:
            raise ConfigError(f"generator.conditioning=norm: arch '{cfg.arch}' with norm '{cfg.norm}' has no "
                              "normalisation layer to condition; set generator.norm=batch or "
                              "generator.conditioning=concat")
        for i in norms:
            layers[i] = ClassNorm(layers[i], num_classes)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        if self.conditioning == "concat":
            return self.net(torch.cat([z, self.embed(y).to(z.dtype)], dim=1))
        x = z
        for layer in self.net.net:
            x = layer(x, y) if isinstance(layer, ClassNorm) else layer(x)
        return x


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
