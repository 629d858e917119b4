"""Evaluation on first use: a one-shard data set with no test split, a run scored from another folder, and
the missing Inception file's message."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from distgan.metrics.feature_net import train_feature_classifier
from distgan.metrics.inception import load_inception_features
from tests.conftest import REPO, require_fashion_mnist, run_cli


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


def _run_in(cwd, module: str, *args: str, check: bool = True):
    """``python -m MODULE ARGS`` from the folder ``cwd`` (the tests' run_cli runs from the repo root)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, f"{module} {args} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.timeout(900)
def test_eval_of_a_run_on_one_shard_from_another_folder(one_shard, tmp_path, monkeypatch):
    """Trained with a relative data.path; scored from elsewhere: the path resolves against the folder training
    started in (RUN/workdir.txt); the classifier is trained on first use with a held-out fifth, and kept in
    distgan's cache folder, not the data folder."""
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))  # cold: no classifier for these shards yet
    work = tmp_path / "work"
    shutil.copytree(one_shard, work / "data" / "fm2k")
    data_files = sorted(p.name for p in (work / "data" / "fm2k").iterdir())
    _run_in(work, "distgan.train", "--config", "smoke", "data.path=data/fm2k", "run.dir=runs/r", "train.steps=4",
            "log.every=2", "log.sample_every=2", "checkpoint.every=2", "log.wandb=false")
    run = work / "runs" / "r"
    assert (run / "workdir.txt").read_text().strip() == str(work)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = json.loads(_run_in(elsewhere, "distgan.eval", "--run", str(run), "--n", "200", "--metrics", "fd",
                             "dc", "is_classifier", "classes_covered", "--classifier-steps", "30").stdout)
    assert out["meta"]["data"] == str(work / "data" / "fm2k")
    assert "held out of training" in out["meta"]["feature_classifier_trained"]["accuracy_on"]
    assert {"fd", "density", "coverage", "is_classifier", "modes_covered"} <= set(out)
    assert sorted(p.name for p in (work / "data" / "fm2k").iterdir()) == data_files  # nothing written there
    assert out["meta"]["feature_classifier_trained"]["path"].startswith(str(tmp_path / "cache" / "data"))
    (run / "workdir.txt").unlink()  # an older run: relative to the current folder, and --data is the way out
    failed = _run_in(elsewhere, "distgan.eval", "--run", str(run), "--n", "200", check=False)
    assert failed.returncode == 2 and "--data DIR" in failed.stderr and "data/fm2k" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
