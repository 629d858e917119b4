"""Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models").

Each real point's ball reaches its k-th nearest real neighbour. Density: how many real balls hold each fake
point, divided by k and averaged (about 1 when fake matches real; above 1 where fakes crowd dense regions).
Coverage: the share of real balls that hold at least one fake point (in [0, 1]). Unlike precision/recall, only
the real manifold is built, so fake outliers cannot inflate it. Membership is strict (distance < radius), as in
the authors' prdc package. Float64, in row chunks.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distgan.metrics.frechet import as_float64_matrix
from distgan.metrics.precision_recall import _knn_radii, _squared_distances
from distgan.metrics.registry import MetricContext

K = 5  # the paper's default (eval.prdc_k)


def density_coverage(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = K, batch: int = 4096) -> dict:
    """{"density", "coverage"} for [N, D] real and [M, D] fake features."""
    x = torch.from_numpy(as_float64_matrix(real, "real features"))
    y = torch.from_numpy(as_float64_matrix(fake, "fake features"))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real features have D={x.shape[1]} but fake have D={y.shape[1]}: use one feature net")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"density_coverage: k={k} must be in [1, {x.shape[0] - 1}] (the real set has {x.shape[0]})")
    radii = _knn_radii(x, k, batch)  # squared
    fake_sq = (y * y).sum(1)
    inside_counts = torch.zeros(y.shape[0], dtype=torch.float64)
    covered = 0
    for start in range(0, x.shape[0], batch):
        inside = _squared_distances(x[start:start + batch], y, fake_sq) < radii[start:start + batch, None]
        inside_counts += inside.sum(dim=0)
        covered += int(inside.any(dim=1).sum())
    return {"density": float(inside_counts.mean() / k), "coverage": covered / x.shape[0]}


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"density", "coverage"}: the sample's features against the real train features, k = eval.prdc_k."""
    return density_coverage(ctx.real["train_features"], ctx.features, k=ctx.prdc_k)
