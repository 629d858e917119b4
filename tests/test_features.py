"""Feature networks: the classifier trained on real Fashion-MNIST, its files, and the FID Inception-v3 loader."""
import gzip
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_fashion_mnist

from distgan.metrics import (
    FeatureClassifier,
    FIDInceptionV3,
    classify,
    evaluate_classifier,
    extract_features,
    load_classifier,
    load_inception_features,
    save_classifier,
    train_classifier,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


def _read_idx(name: str, count: int) -> np.ndarray:
    """The first ``count`` records of an IDX file (images: 16-byte header, labels: 8-byte header)."""
    with gzip.open(FASHION / name) as f:
        data = f.read()
    if "images" in name:
        return np.frombuffer(data, np.uint8, offset=16)[: count * 784].reshape(count, 1, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8)[:count]


def _fashion(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_idx(f"{split}-images-idx3-ubyte.gz", count).astype(np.float32) / 127.5 - 1.0
    labels = _read_idx(f"{split}-labels-idx1-ubyte.gz", count).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _shuffled_batches(images: torch.Tensor, labels: torch.Tensor, size: int, seed: int = 0):
    """Endless epochs of shuffled batches, the same for a seed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - size + 1, size):
            idx = order[start:start + size]
            yield images[idx], labels[idx]


@pytest.fixture(scope="module")
def fashion_classifier():
    require_fashion_mnist()  # a skip on a developer machine, a failure under CI
    train_x, train_y = _fashion("train", 3000)
    test_x, test_y = _fashion("t10k", 1000)
    model = train_classifier(_shuffled_batches(train_x, train_y, 64), channels=1, resolution=28,
                             num_classes=10, steps=250, lr=3e-3, seed=0)
    return model, test_x, test_y


@pytest.mark.timeout(120)
def test_classifier_learns_fashion_mnist(fashion_classifier):
    model, test_x, test_y = fashion_classifier
    accuracy = evaluate_classifier(model, test_x, test_y)
    # measured 0.816 (3000 training images, 250 steps of 64, width 16, 1 thread: about 5 s on the 2-core CPU)
    assert accuracy >= 0.75
    predictions = classify(model, test_x[:200])
    assert predictions.shape == (200,) and predictions.unique().numel() >= 8
    features = extract_features(model.feature_extractor(), test_x[:50])
    assert features.shape == (50, 128) and torch.isfinite(features).all()


def test_classifier_save_load_round_trip(fashion_classifier, tmp_path):
    model, test_x, _ = fashion_classifier
    path = tmp_path / "classifier" / "fashion.safetensors"
    save_classifier(model, path, accuracy=0.8)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["channels"] == 1 and meta["resolution"] == 28 and meta["num_classes"] == 10
    assert meta["arch_version"] == 1 and meta["accuracy"] == 0.8
    assert sorted(p.name for p in path.parent.iterdir()) == ["fashion.json", "fashion.safetensors"]
    loaded = load_classifier(path)
    assert loaded.accuracy == 0.8 and not loaded.training
    before = extract_features(model.feature_extractor(), test_x[:100])
    after = extract_features(loaded.feature_extractor(), test_x[:100])
    assert torch.equal(before, after)


def test_load_classifier_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_classifier(tmp_path / "missing.safetensors")
    path = tmp_path / "c.safetensors"
    save_classifier(FeatureClassifier(1, 28, 10), path)
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "arch_version": 99}))
    with pytest.raises(ValueError, match="arch_version 99"):
        load_classifier(path)
    path.with_suffix(".json").write_text(json.dumps({**meta, "num_classes": 7}))
    with pytest.raises(ValueError, match="do not describe a FeatureClassifier"):
        load_classifier(path)


def test_train_classifier_is_deterministic_for_a_seed():
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    labels = torch.arange(64) % 4

    def weights(seed: int) -> dict:
        batches = _shuffled_batches(images, labels, 16)
        model = train_classifier(batches, channels=3, resolution=32, num_classes=4, steps=6, seed=seed)
        return model.state_dict()

    threads = torch.get_num_threads()
    first, again, other = weights(0), weights(0), weights(1)
    assert torch.get_num_threads() == threads  # train_classifier trains on 1 thread, then restores
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_train_classifier_refuses_too_few_batches():
    batches = [(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))] * 2
    with pytest.raises(ValueError, match="ran out after 2 of 5 steps"):
        train_classifier(iter(batches), channels=1, resolution=28, num_classes=10, steps=5)
    model = train_classifier(itertools.cycle(batches), channels=1, resolution=28, num_classes=10, steps=3)
    assert isinstance(model, FeatureClassifier)


@pytest.mark.parametrize("channels,resolution", [(1, 28), (3, 32), (3, 64), (1, 128)])
def test_classifier_shapes_at_every_resolution(channels, resolution):
    model = FeatureClassifier(channels, resolution, num_classes=10).eval()
    x = torch.rand(2, channels, resolution, resolution) * 2 - 1
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, 128)
    with pytest.raises(ValueError, match=rf"trained on images \[N, {channels}, {resolution}, {resolution}\]"):
        model(torch.zeros(2, channels, resolution + 4, resolution + 4))


def test_extract_features_batches_and_restores_mode():
    torch.manual_seed(0)
    model = FeatureClassifier(1, 28, 10)  # in train mode: batch norm would use batch statistics
    x = torch.rand(10, 1, 28, 28) * 2 - 1
    whole = extract_features(model, x)
    assert torch.allclose(extract_features(model, x, batch=3), whole, atol=1e-6)
    assert model.training and not whole.requires_grad
    with torch.no_grad():
        assert torch.allclose(whole, model.eval()(x), atol=1e-6)


def test_classifier_features_plug_into_torchmetrics_fid():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from distgan.metrics import frechet_distance_from_features

    torch.manual_seed(0)
    features = FeatureClassifier(1, 28, 10).feature_extractor()
    real, fake = torch.rand(300, 1, 28, 28) * 2 - 1, (torch.rand(300, 1, 28, 28) * 2 - 1) * 0.5
    reference = FrechetInceptionDistance(feature=features)  # reads features.num_features
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    features.train()  # a frozen view: batch norm keeps its running statistics
    assert not features.training
    ours = frechet_distance_from_features(extract_features(features, real), extract_features(features, fake))
    assert expected > 0.01 and ours == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------- Inception-v3 for FID


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A state_dict shaped like pytorch-fid's file: the network's keys plus its 1008-way fc head."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = net.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-test.pth"
    torch.save(state, path)
    return net, path


def test_inception_loads_its_own_state_dict_and_gives_2048_features(inception_file):
    original, path = inception_file
    torch.manual_seed(1)
    loaded = load_inception_features(str(path))  # built with other random weights, then overwritten
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())
    gray = torch.rand(2, 1, 32, 32) * 2 - 1
    features = extract_features(loaded, gray)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    # grayscale is repeated to RGB, so the original network on the RGB copy gives the same features
    assert torch.equal(features, extract_features(original, gray.repeat(1, 3, 1, 1)))
    loaded.train()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_inception_loader_errors_name_the_file_and_the_keys(inception_file, tmp_path):
    _, path = inception_file
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*pt_inception-2015-12-05"):
        load_inception_features(tmp_path / "nowhere.pth")
    state = torch.load(path, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(3)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"broken.pth.*Missing 1 keys \['Mixed_7c.branch_pool.conv.weight'\]"
                                         r".*unexpected 1 \['AuxLogits.fc.weight'\]"):
        load_inception_features(broken)


class _FakeScriptedInception(torch.nn.Module):
    """The calling convention of NVlabs' TorchScript Inception: RGB in [0, 255], return_features=True."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = img.mean(dim=(2, 3))  # [N, 3]
        return torch.cat([pooled, pooled.max(dim=1, keepdim=True).values], 1) if return_features else pooled


def test_a_torchscript_inception_file_is_recognised_and_fed_0_255_rgb(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_FakeScriptedInception()), str(path))
    net = load_inception_features(path)
    gray = torch.rand(4, 1, 8, 8) * 2 - 1
    features = extract_features(net, gray)
    rgb255 = (gray.repeat(1, 3, 1, 1) + 1) * 127.5
    assert features.shape == (4, 4) and torch.allclose(features, _FakeScriptedInception()(rgb255, True), atol=1e-4)
    assert 0 <= features.min() and features.max() <= 255


def test_the_two_fid_inception_files_agree_on_features():
    """Both published FID Inception files on the same images (paths in DISTGAN_INCEPTION_PTH and
    DISTGAN_INCEPTION_TS); they cannot be downloaded here, so this runs only where a user provides them."""
    pth, ts = os.environ.get("DISTGAN_INCEPTION_PTH"), os.environ.get("DISTGAN_INCEPTION_TS")
    if not (pth and ts and os.path.isfile(pth) and os.path.isfile(ts)):
        pytest.skip("set DISTGAN_INCEPTION_PTH (pt_inception-2015-12-05-6726825d.pth) and DISTGAN_INCEPTION_TS "
                    "(inception-2015-12-05.pt) to compare the two FID Inception files")
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = extract_features(load_inception_features(pth), images).double()
    b = extract_features(load_inception_features(ts), images).double()
    assert a.shape == b.shape == (16, 2048)
    # one network ported twice from TensorFlow: the features agree up to resize and rounding differences
    assert ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.05
