"""Density and coverage (Naeem et al. 2020) against the formulas of the authors' prdc package, and the
Inception Score's own properties; float64 throughout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distgan.metrics.density_coverage import density_coverage
from distgan.metrics.inception_score import inception_score


def prdc_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """prdc.compute_prdc's density and coverage, written out with numpy (the package's formulas)."""
    def pairwise(a, b):
        return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0))

    real_real = pairwise(real, real)
    radii = np.sort(real_real, axis=1)[:, k]  # the k+1 smallest include the point itself
    real_fake = pairwise(real, fake)
    density = (1.0 / k) * (real_fake < radii[:, None]).sum(axis=0).mean()
    coverage = (real_fake.min(axis=1) < radii).mean()
    return float(density), float(coverage)


@pytest.mark.parametrize("k", [1, 5, 9])
def test_density_and_coverage_equal_the_prdc_formulas(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(400, 8))
    fake = 0.7 * rng.normal(size=(350, 8)) + 0.3
    density, coverage = prdc_density_coverage(real, fake, k)
    ours = density_coverage(real, fake, k=k, batch=64)  # several row chunks
    assert ours["density"] == pytest.approx(density, abs=1e-12)
    assert ours["coverage"] == pytest.approx(coverage, abs=1e-12)
    assert 0.05 < coverage < 0.95 and density > 0.05  # neither saturated: the comparison means something


def test_density_and_coverage_tell_collapse_from_outliers():
    """A collapsed sample covers little; outliers lower density but leave the inliers' coverage."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 4))
    same = density_coverage(real, rng.normal(size=(500, 4)))
    collapsed = density_coverage(real, 0.05 * rng.normal(size=(500, 4)))
    outliers = np.concatenate([rng.normal(size=(400, 4)), rng.normal(size=(100, 4)) + 20.0])
    with_outliers = density_coverage(real, outliers)
    assert 0.8 < same["density"] < 1.2 and same["coverage"] > 0.9
    assert collapsed["coverage"] < 0.2 < same["coverage"]
    assert with_outliers["density"] == pytest.approx(0.8 * same["density"], rel=0.15)
    with pytest.raises(ValueError, match="k=500"):
        density_coverage(real, real, k=500)


def test_inception_score_bounds():
    """Confident, evenly spread predictions score the class count; identical predictions score 1."""
    confident = torch.full((1000, 10), -30.0)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 30.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-9)  # exp(H(marginal))
    assert inception_score(torch.randn(1, 10).expand(500, 10), splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="splits=11"):
        inception_score(torch.randn(10, 3), splits=11)
