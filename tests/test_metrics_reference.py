"""distgan's Inception, FID, KID, IS and precision/recall against torch-fidelity's on the same weights.

torch-fidelity (``pip install --no-deps torch-fidelity``, as launch/setup.sh does) is the reference: its
InceptionV3 is the TensorFlow FID graph ported bit-exactly. Its package __init__ and its ``utils`` import
torchvision (never installed here: it pulls CUDA torch), so its modules are loaded under a stand-in package
that skips that __init__; the functions compared need only torch and numpy.

The weights are random (nothing is downloaded), in pytorch-fid's ``.pth`` layout, with the batch-norm
statistics calibrated on random images: straight from init, the features would not vary with the input.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

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
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.fail(f"torch-fidelity is not installed: python3 -m pip install --no-deps torch-fidelity=={TF_VERSION} "
                    "(launch/setup.sh does)")
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    for key in saved:
        del sys.modules[key]
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
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
    images = to_float(_uint8_images(4, 32, seed=1))
    with torch.no_grad():
        tf = load_inception_features(weights, resize="tf-legacy")(images)
        pt = load_inception_features(weights, resize="pytorch-fid")(images)
    assert not torch.allclose(tf, pt, rtol=1e-3, atol=1e-3)
