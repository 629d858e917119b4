"""Parzen-window log-likelihood (Breuleux et al. 2011), the estimate Goodfellow et al. 2014 report for GANs.

An isotropic Gaussian kernel density with bandwidth sigma is centred on each generated sample; test images
are scored under it. Pixels are mapped to [0, 1] first, the scale the paper's MNIST numbers use, so sigma
is in [0, 1] pixel units. Known to be a poor likelihood estimate in high dimension (Theis et al. 2016);
it is kept to compare with the 2014 tables.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from distgan.data.shards import to_float
from distgan.metrics.frechet import as_float64_matrix
from distgan.metrics.registry import MetricContext

DEFAULT_SIGMAS = np.logspace(-1, 0, 10)  # the grid of the paper's parzen_ll.py (10^-1 .. 10^0)
# The Evaluator's protocol: the full 10k x 10k of the paper takes minutes on a CPU.
PARZEN_SAMPLES = 10_000  # generated images in the window (as the 2014 paper)
PARZEN_TEST = 1_000  # test images scored (the paper scored all 10,000)
PARZEN_VALIDATION = 1_000  # held-out train images that choose sigma


def _to_unit(x: Tensor | np.ndarray, name: str, pixel_range: tuple[float, float]) -> Tensor:
    low, high = pixel_range
    if high <= low:
        raise ValueError(f"parzen: pixel_range={pixel_range} must be (low, high) with low < high")
    return (torch.from_numpy(as_float64_matrix(x, name)) - low) / (high - low)


def parzen_log_likelihoods(
    samples: Tensor | np.ndarray,
    test: Tensor | np.ndarray,
    sigmas: Sequence[float],
    batch: int = 100,
    pixel_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """log p(test_i) for every test point and bandwidth: float64 [n_test, len(sigmas)].

    log p(x) = logsumexp_j(-|x - s_j|^2 / (2 sigma^2)) - log n - d/2 log(2 pi sigma^2).
    """
    s = _to_unit(samples, "parzen samples", pixel_range)
    t = _to_unit(test, "parzen test points", pixel_range)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"parzen: samples have {s.shape[1]} values per image but test points {t.shape[1]}")
    sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64).reshape(-1))
    if sig.numel() == 0 or (sig <= 0).any():
        raise ValueError(f"parzen: sigmas must be positive, got {sig.tolist()}")
    n, d = s.shape
    s_sq = (s * s).sum(1)
    norm = math.log(n) + 0.5 * d * torch.log(2.0 * math.pi * sig * sig)  # [S]
    out = []
    for start in range(0, t.shape[0], batch):
        rows = t[start:start + batch]
        d2 = ((rows * rows).sum(1, keepdim=True) + s_sq[None, :] - 2.0 * rows @ s.T).clamp_min_(0.0)
        per_sigma = [torch.logsumexp(-d2 / (2.0 * float(sg) ** 2), dim=1) for sg in sig]
        out.append(torch.stack(per_sigma, dim=1) - norm[None, :])
    return torch.cat(out).numpy()


def parzen_log_likelihood(
    samples: Tensor | np.ndarray,
    test: Tensor | np.ndarray,
    sigma: float,
    batch: int = 100,
    pixel_range: tuple[float, float] = (-1.0, 1.0),
) -> tuple[float, float]:
    """Mean log-likelihood of the test points and its standard error (std / sqrt(n), as the paper's script)."""
    ll = parzen_log_likelihoods(samples, test, [sigma], batch, pixel_range)[:, 0]
    return float(ll.mean()), float(ll.std() / math.sqrt(ll.shape[0]))


def select_parzen_sigma(
    samples: Tensor | np.ndarray,
    validation: Tensor | np.ndarray,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    batch: int = 100,
    pixel_range: tuple[float, float] = (-1.0, 1.0),
) -> float:
    """The bandwidth of ``sigmas`` with the highest mean validation log-likelihood (distances computed once)."""
    ll = parzen_log_likelihoods(samples, validation, sigmas, batch, pixel_range)
    return float(np.asarray(sigmas, dtype=np.float64).reshape(-1)[int(np.argmax(ll.mean(axis=0)))])


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"parzen_ll", "parzen_se", "parzen_sigma"}: the test split scored under a window on the sample's images,
    sigma chosen on held-out train images."""
    samples = ctx.images[:PARZEN_SAMPLES]
    sigma = select_parzen_sigma(samples, to_float(ctx.real["val_images"]))
    ll, se = parzen_log_likelihood(samples, to_float(ctx.real["test_parzen_images"]), sigma)
    return {"parzen_ll": ll, "parzen_se": se, "parzen_sigma": sigma}
