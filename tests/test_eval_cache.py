"""Evaluation's cache folder: where it is, what keys it, and that the user's data folder is left alone."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from compare import assert_same_text
from distgan import prepare
from distgan.data.shards import write_shards
from distgan.metrics.cache import cache_root, data_cache, dataset_key, find_classifier
from distgan.metrics.features import CLASSIFIER_FILE, FeatureClassifier, save_classifier


def shards(folder: Path, seed: int = 0, n: int = 12) -> Path:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 1), dtype=np.uint8)
    write_shards(list(images), [i % 2 for i in range(n)], folder, classes=["a", "b"], shard_size=5, progress=False)
    return folder


def test_cache_root_follows_distgan_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("DISTGAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "distgan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "distgan"


def test_the_key_is_the_data_sets_identity_not_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    a = shards(tmp_path / "a")
    moved = tmp_path / "elsewhere" / "a"
    moved.parent.mkdir()
    a.rename(moved)
    other = shards(tmp_path / "b", seed=1)  # equal sizes, other pixels
    assert data_cache(moved) == tmp_path / "cache" / "data" / dataset_key(moved)
    assert dataset_key(moved) != dataset_key(other)
    assert dataset_key(shutil.copytree(moved, tmp_path / "copy")) == dataset_key(moved)
    assert dataset_key(tmp_path / "nothing") is None and dataset_key("a.tar::b.tar") is None
    assert data_cache(tmp_path) is None  # a folder without shards has no cache


def test_a_classifier_beside_the_shards_is_read_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    data = shards(tmp_path / "data")
    assert find_classifier(data) is None
    save_classifier(FeatureClassifier(1, 16, 2), data_cache(data) / CLASSIFIER_FILE)
    assert find_classifier(data) == data_cache(data) / CLASSIFIER_FILE
    save_classifier(FeatureClassifier(1, 16, 2), data / CLASSIFIER_FILE)  # where an older distgan kept it
    assert find_classifier(data) == data / CLASSIFIER_FILE


@pytest.mark.parametrize("foreign", [None, "eval_cache/notes.txt", "feature_classifier.txt"])
def test_prepare_force_replaces_what_older_evaluation_left_beside_the_shards(tmp_path, capsys, foreign):
    src = tmp_path / "a.npz"
    np.savez(src, images=np.full((6, 4, 4), 7, np.uint8))
    out = shards(tmp_path / "ds")
    save_classifier(FeatureClassifier(1, 16, 2), out / CLASSIFIER_FILE)
    (out / "eval_cache").mkdir()
    (out / "eval_cache" / "real-classifier-n200-0123.safetensors").write_bytes(b"x")
    if foreign:
        (out / foreign).write_text("keep me")
    code = prepare.main(["npz", "--src", str(src), "--out", str(out), "--force", "--no-progress"])
    err = capsys.readouterr().err
    if foreign is None:
        assert code == 0, err
        assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard-000000.tar"]
    else:
        assert code == 2 and "which distgan did not write" in err
        assert_same_text((out / foreign).read_text(), "keep me", "the foreign file")
