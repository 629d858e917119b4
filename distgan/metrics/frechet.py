"""Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from distgan.errors import UserError
from distgan.metrics.registry import MetricContext

ArrayLike = Union[Tensor, np.ndarray, Sequence]


def _float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def as_float64_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """[N, ...] tensor or array -> finite float64 numpy [N, D] (trailing dims flattened)."""
    arr = _float64(x)
    if arr.ndim < 2:
        raise ValueError(f"{name}: expected a batch [N, D] (or [N, C, H, W]), got shape {tuple(arr.shape)}")
    arr = arr.reshape(arr.shape[0], -1)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or Inf values (did the generator diverge?)")
    return arr


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of [N, D] features, both float64."""
    feats = as_float64_matrix(features, "features")
    if feats.shape[0] < 2:
        raise ValueError(f"features: need at least 2 samples for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], feats.shape[1])


def _clip_rounding(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below rounding level set to 0 (their square roots would be
    ~1e-8 each instead of 0, which adds up to ~1e-7 noise on the distance of singular covariances)."""
    tol = max(float(values.max(initial=0.0)), 0.0) * values.shape[0] * np.finfo(np.float64).eps
    return np.where(values > tol, values, 0.0)


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(_clip_rounding(values))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)).

    The two are equal (similar matrices, and by continuity for singular S1), but the second is a symmetric
    PSD matrix, so eigh gives a real, stable answer where scipy.linalg.sqrtm(S1 S2) returns complex parts
    and needs the eps offset that pytorch-fid adds for singular covariances.
    """
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    values = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(_clip_rounding(values)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); numpy arrays, tensors or lists."""
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    d = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if value.shape != shape:
            raise ValueError(f"frechet_distance: {name} has shape {value.shape}, expected {shape} (from mu1)")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or Inf values")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2.0, (sigma2 + sigma2.T) / 2.0
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(value)


def frechet_distance_from_features(real: ArrayLike, fake: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to [N, D] real and [M, D] fake features."""
    mu_r, sigma_r = feature_stats(real)
    mu_f, sigma_f = feature_stats(fake)
    if mu_r.shape != mu_f.shape:
        raise ValueError(f"real features have D={mu_r.shape[0]} but fake have D={mu_f.shape[0]}: use one feature net")
    return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"fd"}: the sample's features against the real train features (their statistics computed once)."""
    if "fd_real_stats" not in ctx.memo:
        ctx.memo["fd_real_stats"] = feature_stats(ctx.real["train_features"])
    return {"fd": frechet_distance(*ctx.memo["fd_real_stats"], *feature_stats(ctx.features))}


def save_reference_stats(path: Path, features: ArrayLike) -> Path:
    """mu and sigma of real features in the .npz layout pytorch-fid reads (``f["mu"]``, ``f["sigma"]``)."""
    mu, sigma = feature_stats(features)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, path)
    return path


def load_reference_stats(path: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and sigma [D, D] from a pytorch-fid style .npz, checked against the feature network's D."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"eval.reference_stats {path}: not an .npz with 'mu' and 'sigma' ({err}); write one with "
                        "python -m distgan.eval stats") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"eval.reference_stats {path}: mu {mu.shape} / sigma {sigma.shape}, but the feature network "
                        f"gives {dim} features: it was computed with another feature network (eval.features)")
    return mu, sigma
