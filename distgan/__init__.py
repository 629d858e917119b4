"""distgan: DCGAN-style GAN training from one CPU to many GPUs on many nodes.

The public API (what the commands use too)::

    import distgan
    cfg = distgan.load_config("fashion_mnist", ["train.steps=100", "run.dir=runs/try"])
    distgan.fit(cfg)                                   # or distgan.Trainer(cfg).fit()
    G = distgan.load_generator("runs/try")             # a run dir, an export, a checkpoint folder; step=N
    images = G.generate(16, seed=0)                    # uint8 [16, H, W, C]; output="tensor" for floats

Names load on first use, so ``import distgan`` stays light (torch loads with the first name that needs it).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Config": "distgan.config", "ConfigError": "distgan.config", "load_config": "distgan.config",
    "UserError": "distgan.errors",
    "fit": "distgan.api", "Trainer": "distgan.trainer", "build": "distgan.build", "Parts": "distgan.build",
    "first_use": "distgan.build",
    "load_generator": "distgan.loading", "Generator": "distgan.loading", "generate": "distgan.loading",
    "GENERATORS": "distgan.nn", "DISCRIMINATORS": "distgan.nn", "NORMS": "distgan.nn",
    "build_generator": "distgan.nn", "build_discriminator": "distgan.nn",
    "LOSSES": "distgan.losses", "PENALTIES": "distgan.losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distgan' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
