"""distgan's Inception, FID, KID, IS and precision/recall against torch-fidelity's on the same weights.

torch-fidelity is the reference: its InceptionV3 is the TensorFlow FID graph ported bit-exactly. launch/setup.sh
installs it --no-deps into a folder of its own ($DISTGAN_REFERENCE, default ~/.cache/distgan/reference), not
site-packages: its package __init__ imports torchvision (never installed here: it pulls CUDA torch), and
torchmetrics imports torch_fidelity whenever it is installed, which would break torchmetrics' FID. Its modules
are loaded under a stand-in package that skips that __init__; the functions compared need only torch and numpy.

The weights are random (nothing is downloaded), in pytorch-fid's ``.pth`` layout, with the batch-norm
statistics calibrated on random images: straight from init, the features would not vary with the input.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distgan.data.shards import to_float
from distgan.metrics.inception import FIDInceptionV3, load_inception_features

TF_VERSION = "0.4.0"  # launch/setup.sh pins it


@pytest.fixture(scope="module")
def fidelity():
    """torch-fidelity's modules, imported without its package __init__ (which needs torchvision)."""
    folder = Path(os.environ.get("DISTGAN_REFERENCE", Path.home() / ".cache" / "distgan" / "reference"))
    if not (folder / "torch_fidelity" / "feature_extractor_inceptionv3.py").is_file():
        pytest.fail(f"torch-fidelity is not in {folder}: python3 -m pip install --no-deps --target {folder} "
                    f"torch-fidelity=={TF_VERSION} (launch/setup.sh does)")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    for key in saved:
        del sys.modules[key]
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(folder / "torch_fidelity")]
    utils = types.ModuleType("torch_fidelity.utils")  # only its feature-extraction helpers need torchvision
    utils.__getattr__ = lambda name: None
    sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
    try:
        yield types.SimpleNamespace(**{name: importlib.import_module(f"torch_fidelity.{name}") for name in (
            "feature_extractor_inceptionv3", "metric_fid", "metric_kid", "metric_isc", "metric_prc", "version")})
    finally:
        for key in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def _calibrate(net: FIDInceptionV3, images: torch.Tensor) -> None:
    """Every batch norm's running statistics set to its batch statistics on ``images`` (one forward pass)."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum, bn.training = 1.0, True
    with torch.no_grad():
        net(images)
    for bn in norms:
        bn.momentum, bn.training = 0.1, False


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random Inception weights in pytorch-fid's layout (network keys, 1008-way fc head), calibrated."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = FIDInceptionV3()
        fc = nn.Linear(2048, 1008)
    _calibrate(net, torch.rand(6, 3, 32, 32, generator=gen) * 2 - 1)
    state = net.state_dict()
    # logits spread over a few units, so the softmax (and the Inception Score) is far from uniform
    state["fc.weight"], state["fc.bias"] = fc.weight.detach() * 20, fc.bias.detach()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


def _uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [28, 32, 299])
def test_pool_features_and_logits_equal_torch_fidelity(fidelity, weights, size):
    """uint8 images in, as torch-fidelity takes them; distgan sees them as its stream does (x / 127.5 - 1) and
    undoes that exactly (8-bit quantisation), resizes with TF1's bilinear and scales (x - 128) / 128."""
    reference = fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    ours = load_inception_features(weights, resize="tf-legacy")
    images = _uint8_images(3 if size == 299 else 4, size, seed=size)
    with torch.no_grad():
        ref_features, ref_logits = reference(images)
        features = ours(to_float(images))
        logits = ours.logits(features)
    spread = ref_features.std(dim=0).mean()
    assert spread > 1e-2 * ref_features.abs().mean()  # calibrated: the features depend on the image
    assert torch.equal(features, ref_features)
    assert torch.equal(logits, ref_logits)


def test_the_pytorch_fid_resize_is_another_convention(fidelity, weights):
    """eval.resize=pytorch-fid (F.interpolate on the float images) gives other features: the two conventions
    are not interchangeable (real weights: the known pytorch-fid vs TensorFlow FID gap)."""
    images = to_float(_uint8_images(2, 28, seed=1))
    with torch.no_grad():
        tf = load_inception_features(weights, resize="tf-legacy")(images)
        pt = load_inception_features(weights, resize="pytorch-fid")(images)
    assert not torch.allclose(tf, pt, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- the metrics on the same features


@pytest.fixture(scope="module")
def feature_sets():
    """Two float32 feature sets (the dtype torch-fidelity hands its metrics), different in mean and spread."""
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(300, 16, generator=gen)
    fake = 1.3 * torch.randn(260, 16, generator=gen) + 0.2
    return real, fake


def test_fid_equals_torch_fidelity(fidelity, feature_sets):
    from distgan.metrics.frechet import frechet_distance_from_features

    real, fake = feature_sets
    stats = [fidelity.metric_fid.fid_features_to_statistics(f.double()) for f in (real, fake)]
    reference = fidelity.metric_fid.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance_from_features(real, fake)
    # both float64; torch-fidelity takes sqrt of eigenvalues of S1 S2, distgan of a symmetric form: rounding only
    assert ours == pytest.approx(reference, rel=1e-9)


def test_kid_equals_torch_fidelity_x1e3(fidelity, feature_sets):
    """With the subset as large as the smaller set and the same subset drawn, both estimate one unbiased MMD^2:
    distgan's figure is it x 10^3."""
    from distgan.metrics.kid import figures, kernel_inception_distance
    from distgan.metrics.registry import MetricContext

    real, fake = feature_sets
    m = 200
    reference = fidelity.metric_kid.kid_features_to_metric(
        real[:m].double(), fake[:m].double(), kid_subsets=2, kid_subset_size=m, verbose=False, rng_seed=0,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    mean, _ = kernel_inception_distance(real[:m], fake[:m], subsets=1, subset_size=m)
    assert mean == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-9)
    ctx = MetricContext(features=fake[:m], labels=None, images=None, real={"train_features": real[:m]},
                        num_classes=None, conditioned=None, seed=0, memo={})
    assert figures(ctx)["kid_x1e3"] == pytest.approx(1e3 * reference["kernel_inception_distance_mean"], rel=1e-9)


@pytest.mark.parametrize("splits", [1, 10])
def test_inception_score_equals_torch_fidelity(fidelity, splits):
    from distgan.metrics.inception_score import inception_score

    logits = 3 * torch.randn(257, 1008, generator=torch.Generator().manual_seed(3))
    reference = fidelity.metric_isc.isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits, splits=splits, seed=2020)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-9, abs=1e-12)
    assert mean > 1.5  # far from the uniform prediction's score of 1: the comparison means something


def test_precision_recall_equal_torch_fidelity(fidelity, feature_sets):
    """torch-fidelity's features_1 is the generated set, features_2 the real one; both use the k-th neighbour
    (k = 3) and <= for membership."""
    from distgan.metrics.precision_recall import precision_recall

    real, fake = feature_sets
    reference = fidelity.metric_prc.calculate_precision_recall_full(fake.double(), real.double(), neighborhood=3)
    ours = precision_recall(real, fake, k=3)
    # torch-fidelity averages the 0/1 memberships in float32: compare the counts they come from
    assert round(ours["precision"] * len(fake)) == round(reference[0] * len(fake))
    assert round(ours["recall"] * len(real)) == round(reference[1] * len(real))
    assert ours["precision"] == pytest.approx(reference[0], rel=1e-6)
    assert 0.05 < ours["precision"] < 0.99 and 0.05 < ours["recall"] < 0.99  # neither saturated


def test_scores_of_the_same_logits_agree_end_to_end(fidelity, weights):
    """Images -> distgan's Inception logits -> distgan's IS equals images -> torch-fidelity's logits -> its IS."""
    from distgan.metrics.inception_score import inception_score

    reference_net = fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=str(weights))
    images = _uint8_images(6, 28, seed=11)
    with torch.no_grad():
        (ref_logits,) = reference_net(images)
        ours = load_inception_features(weights)
        logits = ours.logits(ours(to_float(images)))
    reference = fidelity.metric_isc.isc_features_to_metric(ref_logits, splits=2, rng_seed=0)
    assert inception_score(logits, splits=2, seed=0)[0] == pytest.approx(reference["inception_score_mean"], rel=1e-12)
