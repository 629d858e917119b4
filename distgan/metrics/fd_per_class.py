"""Per-class Frechet distance of a class-conditional generator: for each class K, the Frechet distance between
the features of the images generated for K and those of the real training images labeled K.

Class agreement alone can be gamed: one sharp image per class scores 100%. A class whose samples all look alike
has a small feature covariance, which this distance charges through its trace term. With n generated images
and K classes each class has about n/K samples: the estimate is biased upwards for small n/K (as the overall fd
is for small n), so compare runs at the same eval.n only.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from distgan.metrics.frechet import feature_stats, frechet_distance
from distgan.metrics.registry import MetricContext

MIN_PER_CLASS = 2  # a covariance needs two samples


def per_class_frechet(features: Tensor, classes: Tensor, real_stats: dict[int, tuple[np.ndarray, np.ndarray]]
                      ) -> dict[int, float]:
    """{class: Frechet distance of that class's ``features`` to its real statistics ``real_stats[class]``}."""
    out: dict[int, float] = {}
    for k, (mu, sigma) in sorted(real_stats.items()):
        mine = features[classes == k]
        if len(mine) < MIN_PER_CLASS:
            raise ValueError(f"per-class fd: {len(mine)} generated images of class {k}; raise eval.n to at least "
                             f"{MIN_PER_CLASS * len(real_stats)}")
        out[k] = frechet_distance(mu, sigma, *feature_stats(mine))
    return out


def real_class_stats(features: Tensor, labels: Tensor) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Mean and covariance of the real features of each class with at least two images."""
    return {int(k): feature_stats(features[labels == k]) for k in labels.unique().tolist()
            if int((labels == k).sum()) >= MIN_PER_CLASS}


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"fd_per_class": mean over classes, "fd_worst_class": the largest}; real statistics computed once."""
    if "fd_class_stats" not in ctx.memo:
        if "train_true_labels" not in ctx.real:
            raise ValueError("per-class fd needs the real images' labels; the data has none")
        ctx.memo["fd_class_stats"] = real_class_stats(ctx.real["train_features"], ctx.real["train_true_labels"])
    distances = per_class_frechet(ctx.features, ctx.conditioned, ctx.memo["fd_class_stats"])
    values = np.array(list(distances.values()), dtype=np.float64)
    return {"fd_per_class": float(values.mean()), "fd_worst_class": float(values.max())}
