"""Generator and discriminator builders, latent sampling and distgan's synchronized batch norm.

Every generator has ``.z_dim`` and maps z [B, z_dim] to images [B, C, R, R] in [-1, 1]; every
discriminator maps images [B, C, R, R] to raw logits [B]. A conditional one (``conditional: true``, built
with ``num_classes``) takes class indices y [B] too: ``G(z, y)``, ``D(x, y)`` (see distgan.nn.conditional).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

import torch
from torch import Tensor, nn

from distgan.config import ConfigError, DiscriminatorConfig, GeneratorConfig
from distgan.nn.conditional import ConditionalGenerator, ProjectionDiscriminator
from distgan.nn.crop import CenterCrop, cropped
from distgan.nn.layers import NORMS
from distgan.nn.registry import DISCRIMINATORS, GENERATORS, RESOLUTIONS
from distgan.nn.syncbn import SyncBatchNorm, convert_sync_batchnorm
from distgan.registry import RegistryError, is_import_path

# every module of this package is imported, so an architecture registers itself by being a file here (nn/NAME.py)
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "build_generator", "build_discriminator", "sample_latent", "sample_labels", "SyncBatchNorm", "convert_sync_batchnorm",
    "GENERATORS", "DISCRIMINATORS", "RESOLUTIONS", "NORMS", "padded_resolution", "CenterCrop", "cropped",
]


def _check_image(resolution: int, channels: int, who: str) -> None:
    if resolution < 1 or channels < 1:
        raise ConfigError(f"{who}: resolution and channels must be positive, got {resolution} and {channels}")


def padded_resolution(resolution: int, pad: int, generator: GeneratorConfig, discriminator: DiscriminatorConfig) -> int:
    """The resolution G and D are built at for data of ``resolution`` with ``data.pad`` pixels added on each side;
    a pad that gives one an architecture cannot build at is refused, naming data.pad."""
    padded = resolution + 2 * pad
    if pad == 0:
        return padded  # unpadded: the architectures' own errors, as before
    for who, arch in (("generator", generator.arch), ("discriminator", discriminator.arch)):
        if arch not in RESOLUTIONS:  # a user's own network says what it builds at by building (or refusing)
            continue
        builds, supported = RESOLUTIONS[arch]
        if not builds(padded):
            raise ConfigError(f"config key 'data.pad' = {pad}: pads the {resolution}x{resolution} images to "
                              f"{padded}x{padded}, which {who}.arch={arch} does not support (supported: {supported}); "
                              f"choose data.pad so that {resolution} + 2 x data.pad is one of them, or data.pad=0")
    return padded


def _check_classes(num_classes: Optional[int], who: str) -> None:
    if (num_classes is None or num_classes < 2):
        raise ConfigError(f"{who}.conditional=true needs labeled data with at least 2 classes (dataset.json "
                          f"'classes'), got {num_classes}: prepare labeled shards or set {who}.conditional=false")


def _user_network(registry, cfg, who: str, resolution: int, channels: int, num_classes: Optional[int]) -> nn.Module:
    """A user's own network, ``cfg.arch`` = ``package.module:Class``: ``Class(cfg, resolution, channels,
    **cfg.kwargs)``, plus ``num_classes=K`` when ``cfg.conditional`` (it is then called with class indices too)."""
    try:
        cls = registry.resolve(cfg.arch)
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    extra = dict(cfg.kwargs, **({"num_classes": num_classes} if cfg.conditional else {}))
    try:
        net = cls(cfg, resolution, channels, **extra)
    except TypeError as err:  # the constructor contract, named with what was passed
        raise ConfigError(f"{who}.arch = '{cfg.arch}': {cls.__name__}(cfg, resolution={resolution}, channels={channels}"
                          f"{''.join(f', {k}=...' for k in extra)}) failed ({err}); see the README's 'Your own "
                          f"networks' for the constructor contract, and {who}.kwargs for extra arguments") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{who}.arch = '{cfg.arch}' made a {type(net).__name__}, not a torch.nn.Module")
    return net


def _builtin_kwargs(cfg, who: str) -> None:
    if cfg.kwargs:
        raise ConfigError(f"config key '{who}.kwargs' = {cfg.kwargs!r}: only a user's own network "
                          f"({who}.arch=package.module:Class) takes extra arguments; {who}.arch={cfg.arch} does not")


def build_generator(cfg: GeneratorConfig, resolution: int, channels: int,
                    num_classes: Optional[int] = None) -> nn.Module:
    """The generator ``cfg.arch`` for ``channels`` x ``resolution`` x ``resolution`` images (of ``num_classes``
    classes when ``cfg.conditional``). A user's own (an import path) maps z [B, cfg.z_dim] (and y [B] when
    conditional) to images [B, channels, resolution, resolution] in [-1, 1]."""
    _check_image(resolution, channels, "generator")
    if cfg.conditional:
        _check_classes(num_classes, "generator")
    if is_import_path(cfg.arch):
        net = _user_network(GENERATORS, cfg, "generator", resolution, channels, num_classes)
        net.z_dim = cfg.z_dim  # what sampling and cropping read
        return net
    _builtin_kwargs(cfg, "generator")
    if cfg.conditional:
        return ConditionalGenerator(GENERATORS[cfg.arch], cfg, resolution, channels, num_classes)
    return GENERATORS[cfg.arch](cfg, resolution, channels)


def build_discriminator(cfg: DiscriminatorConfig, resolution: int, channels: int,
                        num_classes: Optional[int] = None) -> nn.Module:
    """The discriminator ``cfg.arch`` for ``channels`` x ``resolution`` x ``resolution`` images (with a projection
    head over ``num_classes`` classes when ``cfg.conditional``). A user's own (an import path) maps images (and
    y [B] when conditional) to raw logits [B]."""
    _check_image(resolution, channels, "discriminator")
    if cfg.conditional:
        _check_classes(num_classes, "discriminator")
    if is_import_path(cfg.arch):
        return _user_network(DISCRIMINATORS, cfg, "discriminator", resolution, channels, num_classes)
    _builtin_kwargs(cfg, "discriminator")
    if cfg.conditional:
        return ProjectionDiscriminator(DISCRIMINATORS[cfg.arch], cfg, resolution, channels, num_classes)
    return DISCRIMINATORS[cfg.arch](cfg, resolution, channels)


def sample_labels(n: int, num_classes: int, generator: Optional[torch.Generator] = None, device: Any = None) -> Tensor:
    """``n`` class indices drawn uniformly (on the generator's device, then moved to ``device``)."""
    draw_device = generator.device if generator is not None else device
    y = torch.randint(num_classes, (n,), generator=generator, device=draw_device)
    return y.to(device) if device is not None else y


def sample_latent(
    n: int, z_dim: int, dist: str, generator: Optional[torch.Generator] = None, device: Any = None
) -> torch.Tensor:
    """``n`` latent vectors: N(0, 1) for 'normal', uniform on [-1, 1] for 'uniform'.

    Numbers are drawn on the generator's device (so a CPU generator gives the same z whatever
    ``device`` is) and then moved to ``device``.
    """
    draw_device = generator.device if generator is not None else device
    if dist == "normal":
        z = torch.randn(n, z_dim, generator=generator, device=draw_device)
    elif dist == "uniform":
        z = torch.rand(n, z_dim, generator=generator, device=draw_device) * 2.0 - 1.0
    else:
        raise KeyError(dist)  # unreachable for a validated config (config.validate owns the choices)
    return z.to(device) if device is not None else z
