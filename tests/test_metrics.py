"""Metrics on hand-checked cases: closed forms, tiny examples worked out by hand, and torchmetrics as a reference."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from distgan.metrics import (
    class_coverage,
    extract_features,
    feature_stats,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    parzen_log_likelihood,
    precision_recall,
    select_parzen_sigma,
)
from distgan.metrics.kid import mmd2_unbiased


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ---------------------------------------------------------------- Frechet distance


def test_frechet_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    # one dimension by hand: mu 0 vs 3, variances 1 vs 4: 9 + 1 + 4 - 2 * 2 = 10
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, rel=1e-12)


def test_frechet_full_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_singular_covariances_is_finite_and_zero_for_equal_ones():
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(8, 3))
    sigma = low_rank @ low_rank.T  # rank 3 in 8 dimensions
    mu = rng.normal(size=8)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    # shifting the mean adds exactly |shift|^2, whatever the covariances
    assert frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(8 * 0.25, abs=1e-7)
    few = torch.relu(_gaussian(10, 32, seed=3))  # fewer samples than dimensions: a singular covariance
    assert abs(frechet_distance_from_features(few, few)) < 1e-9


def test_feature_stats_mean_and_unbiased_covariance():
    mean, cov = feature_stats(torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]))
    np.testing.assert_allclose(mean, [2.0, 2.0])
    # var(0, 2, 4) = 8 / 2 = 4; var(1, 1, 4) = (1 + 1 + 4) / 2 = 3; cov = ((-2)(-1) + 0 + 2 * 2) / 2 = 3
    np.testing.assert_allclose(cov, [[4.0, 3.0], [3.0, 3.0]])
    assert mean.dtype == np.float64 and cov.dtype == np.float64


def test_frechet_from_features_identical_zero_and_shift_exact():
    feats = _gaussian(400, 16, seed=0)
    assert abs(frechet_distance_from_features(feats, feats)) < 1e-9
    # a constant shift c in every dimension leaves the covariance and adds D * c^2
    assert frechet_distance_from_features(feats, feats + 0.5) == pytest.approx(16 * 0.25, rel=1e-9)


def test_frechet_rejects_mismatched_or_nonfinite_features():
    with pytest.raises(ValueError, match="D=4 but fake have D=3"):
        frechet_distance_from_features(torch.zeros(5, 4), torch.zeros(5, 3))
    bad = torch.ones(5, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        frechet_distance_from_features(torch.randn(5, 3), bad)


def test_frechet_matches_torchmetrics_with_a_custom_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12), nn.Tanh())
    net.num_features = 12  # torchmetrics reads the feature size from here instead of probing with a dummy image
    real = torch.rand(300, 3, 8, 8) * 2 - 1
    fake = (torch.rand(300, 3, 8, 8) * 2 - 1) * 0.7 + 0.1
    reference = FrechetInceptionDistance(feature=net)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    ours = frechet_distance_from_features(extract_features(net, real), extract_features(net, fake))
    assert expected > 0.1
    assert ours == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------- KID


def test_mmd2_unbiased_by_hand():
    x = np.array([[0.0, 1.0], [1.0, 0.0]])
    y = np.array([[1.0, 1.0], [0.0, 0.0]])
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731
    within = (k(x[0], x[1]) * 2 + k(y[0], y[1]) * 2) / 2  # off-diagonal pairs, m (m - 1) = 2
    between = sum(k(a, b) for a in x for b in y) / 4
    assert mmd2_unbiased(x, y) == pytest.approx(within - 2 * between, rel=1e-12)
    # with subset_size = the set sizes every subset is the whole set: std 0, mean the same number
    mean, std = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=5)
    assert mean == pytest.approx(within - 2 * between, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_shifted_clearly_positive():
    real, other = _gaussian(2000, 8, seed=0), _gaussian(2000, 8, seed=1)
    same = kernel_inception_distance(real, other, subsets=10, subset_size=1000)
    shifted = kernel_inception_distance(real, other + 1.0, subsets=10, subset_size=1000)
    assert shifted[0] > 5.0 and shifted[1] < 0.1 * shifted[0]
    assert abs(same[0]) < 1e-3 * shifted[0]


def test_kid_of_one_set_with_itself_has_only_the_overlap_bias():
    # The same tensor on both sides: subsets share points, whose k(x, x) counts in the cross term but not in
    # the within terms. With subset_size = N both subsets are the whole set, and the estimate is exactly
    # 2 / (m (m - 1)) * (sum(K) / m - trace(K)): negative and O(1/m), as in every KID implementation.
    x = _gaussian(400, 8, seed=0)
    kernel = (x @ x.T / 8 + 1) ** 3
    m = 400
    expected = 2 / (m * (m - 1)) * (float(kernel.sum()) / m - float(kernel.trace()))
    mean, std = kernel_inception_distance(x, x, subsets=3, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-9) and std < 1e-12
    assert -0.05 < mean < 0


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
@pytest.mark.parametrize("n,d,shift", [(300, 16, 0.1), (257, 5, 0.0), (120, 64, 0.5)])
def test_kid_matches_torchmetrics_on_the_whole_set(n, d, shift):
    """With subsets=1 and subset_size=N both draw every sample once (in an order that does not matter), so both
    are the unbiased MMD^2 of the full sets with the same kernel (x.y / d + 1)^3. Only summation order differs:
    float64 sums of N^2 kernel entries of order 1 agree to ~N eps = 3e-14 relative, and the difference of the
    three terms (each ~1, the result >= 1e-3 here) loses at most 3 decades more: 1e-10 leaves margin above that."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _gaussian(n, d, seed=n)
    fake = _gaussian(n, d, seed=n + 1, shift=shift) * 1.2
    reference = KernelInceptionDistance(feature=nn.Identity(), subsets=1, subset_size=n)  # features in, features out
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected_mean, expected_std = reference.compute()
    assert expected_mean.dtype == torch.float64  # the comparison is in float64 end to end
    mean, std = kernel_inception_distance(real, fake, subsets=1, subset_size=n)
    assert abs(float(expected_mean)) > 1e-3  # a figure well away from 0, so a relative tolerance means something
    assert mean == pytest.approx(float(expected_mean), rel=1e-10)
    assert std == float(expected_std) == 0.0


def test_kid_is_deterministic_for_a_seed():
    real, fake = _gaussian(300, 8, seed=1), _gaussian(300, 8, seed=2, shift=0.2)
    first = kernel_inception_distance(real, fake, subsets=10, subset_size=100, seed=3)
    assert first == kernel_inception_distance(real, fake, subsets=10, subset_size=100, seed=3)
    assert first != kernel_inception_distance(real, fake, subsets=10, subset_size=100, seed=4)


# ---------------------------------------------------------------- precision / recall


def test_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    # k=1: real radii are 1, so 0.5 is inside and 10 is not; fake radii are 9.5, so every real point is inside
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0, "k": 1}


def test_precision_recall_identical_and_disjoint():
    real = _gaussian(300, 8, seed=0)
    identical = precision_recall(real, real.clone(), k=3)
    assert identical["precision"] == 1.0 and identical["recall"] == 1.0
    far = precision_recall(real, _gaussian(300, 8, seed=1, shift=100.0), k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_precision_recall_mode_collapse_keeps_precision_loses_recall():
    cluster_a, cluster_b = _gaussian(200, 4, seed=0), _gaussian(200, 4, seed=1, shift=50.0)
    real = torch.cat([cluster_a, cluster_b])
    fake = cluster_a[:100]  # real points from one of the two modes
    result = precision_recall(real, fake, k=3)
    assert result["precision"] == 1.0
    assert 0.2 < result["recall"] <= 0.5  # cluster B (half the real data) is never covered
    assert precision_recall(real, fake, k=3, batch=7) == result  # chunking does not change the answer


# ---------------------------------------------------------------- class coverage


def test_coverage_one_class_sampler():
    result = class_coverage(torch.full((500,), 3), num_classes=10)
    assert result["modes_covered"] == 1 and result["num_classes"] == 10
    assert result["histogram"][3] == 1.0 and sum(result["histogram"]) == 1.0
    eps = 1e-6
    fake = np.full(10, eps) / (1 + 10 * eps)
    fake[3] = (1 + eps) / (1 + 10 * eps)
    assert result["kl_to_real"] == pytest.approx(float(np.sum(0.1 * np.log(0.1 / fake))), rel=1e-12)
    assert result["kl_to_real"] > 10.0


def test_coverage_uniform_sampler_and_min_share():
    result = class_coverage(torch.arange(10).repeat(100), num_classes=10)
    assert result["modes_covered"] == 10 and result["kl_to_real"] == pytest.approx(0.0, abs=1e-9)
    assert result["counts"] == [100] * 10
    labels = torch.cat([torch.arange(9).repeat(111), torch.tensor([9])])  # class 9 has 1 of 1000 samples
    assert class_coverage(labels, 10)["modes_covered"] == 10
    assert class_coverage(labels, 10, min_share=0.01)["modes_covered"] == 9


def test_coverage_against_a_given_real_histogram():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    matched = class_coverage(labels, 3, real_hist=torch.tensor([600, 300, 100]))
    assert matched["kl_to_real"] == pytest.approx(0.0, abs=1e-5)
    uniform = class_coverage(labels, 3)
    expected = sum(1 / 3 * math.log((1 / 3) / p) for p in (0.6, 0.3, 0.1))
    assert uniform["kl_to_real"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match=r"integers in \[0, 3\)"):
        class_coverage(torch.tensor([0, 3]), 3)


# ---------------------------------------------------------------- Parzen window


def test_parzen_single_sample_analytic():
    d, sigma = 5, 0.3
    point = torch.zeros(1, d)
    # the test point at the kernel centre: log N(0; 0, sigma^2 I) = -d/2 log(2 pi sigma^2)
    mean, se = parzen_log_likelihood(point, point, sigma)
    assert mean == pytest.approx(-d / 2 * math.log(2 * math.pi * sigma**2), rel=1e-12) and se == 0.0
    # default pixel range [-1, 1] maps to [0, 1]: a distance of 1.0 per pixel becomes 0.5
    off = torch.full((1, d), 1.0)
    expected = -(d * 0.25) / (2 * sigma**2) - d / 2 * math.log(2 * math.pi * sigma**2)
    assert parzen_log_likelihood(point, off, sigma)[0] == pytest.approx(expected, rel=1e-12)
    assert parzen_log_likelihood(point, off / 2, sigma, pixel_range=(0.0, 1.0))[0] == pytest.approx(expected, rel=1e-12)


def test_parzen_mixture_and_standard_error():
    samples = torch.tensor([[0.0], [1.0]])
    test = torch.tensor([[0.0], [0.5]])
    sigma = 0.2
    norm = -math.log(2) - 0.5 * math.log(2 * math.pi * sigma**2)
    ll = np.array([
        norm + math.log(1 + math.exp(-1 / (2 * sigma**2))),
        norm + math.log(2 * math.exp(-0.25 / (2 * sigma**2))),
    ])
    mean, se = parzen_log_likelihood(samples, test, sigma, batch=1, pixel_range=(0.0, 1.0))
    assert mean == pytest.approx(ll.mean(), rel=1e-12)
    assert se == pytest.approx(ll.std() / math.sqrt(2), rel=1e-9)


def test_parzen_sigma_selection_picks_the_analytic_optimum():
    # one sample at 0, validation at 0.2 in each of 4 pixels: ll(s) = -0.16 / (2 s^2) - 2 log(2 pi s^2),
    # maximised at s^2 = 0.16 / 4, s = 0.2
    samples, validation = torch.zeros(1, 4), torch.full((1, 4), 0.2)
    grid = [0.1, 0.2, 0.5, 1.0]
    assert select_parzen_sigma(samples, validation, grid, pixel_range=(0.0, 1.0)) == 0.2
    default = select_parzen_sigma(samples, validation, pixel_range=(0.0, 1.0))
    best = max(np.logspace(-1, 0, 10), key=lambda s: -0.16 / (2 * s * s) - 2 * math.log(2 * math.pi * s * s))
    assert default == pytest.approx(best)
