"""The architectures ``generator.arch`` and ``discriminator.arch`` name, each registered in its own file.

A built-in is a class ``Cls(cfg, resolution, channels)`` registered with :func:`architecture`, which also records
the resolutions it builds at (``data.pad``'s check names them). A user's own network is an import path
``package.module:Class`` (see :func:`distgan.nn.build_generator` for its constructor contract).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from distgan.registry import Registry

GENERATORS: Registry[Callable[..., nn.Module]] = Registry("generator.arch", allow_import=True)
DISCRIMINATORS: Registry[Callable[..., nn.Module]] = Registry("discriminator.arch", allow_import=True)
# arch -> (whether it builds at a resolution, the resolutions it builds at in words)
RESOLUTIONS: dict[str, tuple[Callable[[int], bool], str]] = {}
ANY_RESOLUTION: tuple[Callable[[int], bool], str] = (lambda r: r >= 1, "any")


def architecture(registry: Registry, name: str, builds_at: Callable[[int], bool] = ANY_RESOLUTION[0],
                 supported: str = ANY_RESOLUTION[1]) -> Callable[[type], type]:
    """Register a built-in network class under ``name`` in ``registry`` (GENERATORS or DISCRIMINATORS)."""
    def add(cls: type) -> type:
        registry.register(name)(cls)
        RESOLUTIONS.setdefault(name, (builds_at, supported))
        return cls
    return add
