"""Improved precision and recall (Kynkaanniemi et al. 2019) from k-nearest-neighbour manifolds.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th nearest
neighbour in the same set. Precision is the share of fake points inside the real manifold (quality); recall
is the share of real points inside the fake manifold (diversity). Distances are computed in float64, in
row chunks, so memory stays at ``batch x N``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distgan.metrics.frechet import as_float64_matrix
from distgan.metrics.registry import MetricContext

K = 3  # neighbours in the Evaluator's protocol (the paper's default)


def _squared_distances(rows: Tensor, cols: Tensor, cols_sq: Tensor) -> Tensor:
    """|r|^2 + |c|^2 - 2 r.c, built in place: one [rows, cols] float64 buffer per chunk."""
    d2 = rows @ cols.T
    return d2.mul_(-2.0).add_((rows * rows).sum(1, keepdim=True)).add_(cols_sq[None, :]).clamp_min_(0.0)


def _knn_radii(points: Tensor, k: int, batch: int) -> Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    sq = (points * points).sum(1)
    radii = []
    for start in range(0, points.shape[0], batch):
        d2 = _squared_distances(points[start:start + batch], points, sq)
        # k + 1 smallest, as the smallest is the point itself; topk is ~8x faster than kthvalue here
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _share_inside(queries: Tensor, points: Tensor, radii: Tensor, batch: int) -> float:
    """Share of queries within the radius of at least one point of the manifold."""
    sq = (points * points).sum(1)
    inside = 0
    for start in range(0, queries.shape[0], batch):
        d2 = _squared_distances(queries[start:start + batch], points, sq)
        inside += int((d2 <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = K, batch: int = 4096
) -> dict:
    """{"precision", "recall", "k"} for [N, D] real and [M, D] fake features."""
    x = torch.from_numpy(as_float64_matrix(real, "real features"))
    y = torch.from_numpy(as_float64_matrix(fake, "fake features"))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real features have D={x.shape[1]} but fake have D={y.shape[1]}: use one feature net")
    smallest = min(x.shape[0], y.shape[0])
    if not 1 <= k < smallest:
        raise ValueError(f"precision_recall: k={k} must be in [1, {smallest - 1}] (smallest set has {smallest})")
    if batch < 1:
        raise ValueError(f"precision_recall: batch={batch} must be at least 1")
    real_radii = _knn_radii(x, k, batch)
    fake_radii = _knn_radii(y, k, batch)
    return {
        "precision": _share_inside(y, x, real_radii, batch),
        "recall": _share_inside(x, y, fake_radii, batch),
        "k": k,
    }


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"precision", "recall"}: the sample's features against the real train features, k = K."""
    pr = precision_recall(ctx.real["train_features"], ctx.features, k=K)
    return {"precision": pr["precision"], "recall": pr["recall"]}
