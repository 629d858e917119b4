"""Sample-quality metrics as pure functions of features or labels, the feature networks that produce them,
the metric registry and the Evaluator that runs them on a generator.

Every metric takes tensors (or numpy arrays) and returns plain floats/dicts, computed in float64 and
deterministic for a given input (and seed, where there is randomness). Nothing here touches Accelerate.
The names below load on first use, so ``distgan.metrics.registry`` (read by config validation) comes
without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "class_coverage": "coverage",
    "FeatureClassifier": "features",
    "classify": "features",
    "evaluate_classifier": "features",
    "extract_features": "features",
    "load_classifier": "features",
    "save_classifier": "features",
    "train_classifier": "features",
    "FIDInceptionV3": "inception",
    "load_inception_features": "inception",
    "feature_stats": "frechet",
    "frechet_distance": "frechet",
    "frechet_distance_from_features": "frechet",
    "kernel_inception_distance": "kid",
    "parzen_log_likelihood": "parzen",
    "parzen_log_likelihoods": "parzen",
    "select_parzen_sigma": "parzen",
    "precision_recall": "precision_recall",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'distgan.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"distgan.metrics.{home}"), name)
    globals()[name] = value
    return value
