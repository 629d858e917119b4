"""Evaluation on first use: a one-shard data set with no test split, and the missing Inception file's message."""
from __future__ import annotations

import json

import pytest

from distgan.metrics.feature_net import train_feature_classifier
from distgan.metrics.inception import load_inception_features
from tests.conftest import require_fashion_mnist, run_cli


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """2,000 Fashion-MNIST images in one shard, no test split: what prepare --limit 2000 makes."""
    require_fashion_mnist()
    out = tmp_path_factory.mktemp("one_shard") / "fm2k"
    run_cli("distgan.prepare", "fashion-mnist", "--out", str(out), "--limit", "2000")
    assert len(list(out.glob("*.tar"))) == 1
    return out


@pytest.mark.timeout(300)
def test_one_shard_holds_out_a_seeded_fifth_and_says_so(one_shard):
    report = train_feature_classifier(str(one_shard), steps=60, seed=0)
    assert report["accuracy_images"] == 400 and "400 of the 2000 images" in report["accuracy_on"]
    assert "held out of training" in report["accuracy_on"]
    assert report["accuracy"] > 0.5  # 60 steps on 1,600 images: well above chance (0.1) on unseen images
    again = train_feature_classifier(str(one_shard), steps=60, seed=0)
    assert again["accuracy"] == report["accuracy"]  # the same held-out images, the same training


def test_missing_inception_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_inception_features(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    message = str(err.value)
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in message
    assert "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2" in message
    assert "stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt" in message
    assert "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4" in message
