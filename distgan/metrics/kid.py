"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel.

k(x, y) = (x . y / d + 1)^3, averaged over random subsets, as in stylegan2-ada-pytorch and torch-fidelity.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from distgan.metrics.frechet import as_float64_matrix
from distgan.metrics.registry import MetricContext

SUBSETS, SUBSET_SIZE = 100, 1000  # the Evaluator's protocol (stylegan2-ada-pytorch's)


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two equal-size samples [m, D] (diagonals of the within-set kernels dropped)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real: Tensor | np.ndarray,
    fake: Tensor | np.ndarray,
    subsets: int = SUBSETS,
    subset_size: int = SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and (population) standard deviation of MMD^2 over ``subsets`` random subsets of both sets.

    Each subset draws ``min(subset_size, len(real), len(fake))`` samples without replacement from each set,
    from one numpy Generator seeded with ``seed``, so the figures are reproducible. Passing the same tensor
    twice does not give 0: overlapping subsets put k(x, x) in the cross term, a bias of order -1/m.
    """
    x = as_float64_matrix(real, "real features")
    y = as_float64_matrix(fake, "fake features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"real features have D={x.shape[1]} but fake have D={y.shape[1]}: use one feature net")
    if subsets < 1:
        raise ValueError(f"kernel_inception_distance: subsets={subsets} must be at least 1")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"kernel_inception_distance: need at least 2 samples per set, got subset size {m}")
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        scores[i] = mmd2_unbiased(xs, ys)
    return float(scores.mean()), float(scores.std())


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"kid_x1e3", "kid_std_x1e3"}: the sample's features against the real train features, MMD^2 x 10^3."""
    real = ctx.real["train_features"]
    # subsets as large as both sets are all the same set: one is enough (and its std is 0)
    whole = len(real) == len(ctx.features) <= SUBSET_SIZE
    kid, kid_std = kernel_inception_distance(real, ctx.features, 1 if whole else SUBSETS, SUBSET_SIZE, seed=ctx.seed)
    return {"kid_x1e3": kid * 1e3, "kid_std_x1e3": kid_std * 1e3}
