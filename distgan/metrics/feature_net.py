"""The feature network of a dataset: the classifier distgan trains (kept in its cache folder), or Inception-v3.

``load_feature_net`` resolves eval.features for the Evaluator; ``train_feature_classifier`` is the body of
``python -m distgan.eval train-features``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from distgan.config import ConfigError, DataConfig, EvalConfig
from distgan.data.errors import DataError
from distgan.data.shards import DatasetInfo, read_dataset_info, read_images, to_float
from distgan.data.stream import make_batch_iterator
from distgan.metrics.cache import classifier_target, data_cache, find_classifier
from distgan.metrics.features import (
    CLASSIFIER_FILE, FeatureClassifier, evaluate_classifier, load_classifier, save_classifier, train_classifier,
)
from distgan.metrics.inception import INCEPTION_FILE, load_inception_features

log = logging.getLogger(__name__)

TRAIN_FEATURES_HINT = "python -m distgan.eval train-features --data {path}"
TRAIN_FEATURES_DEFAULTS = dict(steps=2000, batch=64, lr=3e-3)
CLASSIFIER_EVAL_IMAGES = 10_000  # test (or held-out) images the accuracy is measured on
HELD_OUT_DIVISOR = 5  # one shard, no test split: a fifth of its images (at most CLASSIFIER_EVAL_IMAGES) is held out


def file_digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


@dataclass
class FeatureNet:
    """The network whose features the metrics compare, and the classifier that labels images (coverage)."""

    kind: str  # "classifier" or "inception"
    extractor: nn.Module
    classifier: Optional[FeatureClassifier]
    digest: str  # hash of the weights: keys the disk cache


def load_feature_net(cfg: EvalConfig, data_path: str, info: DatasetInfo) -> FeatureNet:
    """Resolve eval.features (auto: the data set's classifier, else Inception when configured)."""
    classifier_path = find_classifier(data_path)
    kind = cfg.features
    if kind == "auto":
        kind = "classifier" if classifier_path else "inception" if cfg.inception_weights else None
        if kind is None:
            raise ConfigError(
                f"eval.features=auto: no feature network for '{data_path}' (no feature classifier trained on it and "
                f"no eval.inception_weights). Train one: {TRAIN_FEATURES_HINT.format(path=data_path)}"
            )
    if kind == "classifier" and classifier_path is None:
        raise ConfigError(f"eval.features=classifier: no feature classifier trained on '{data_path}' yet. Train it: "
                          + TRAIN_FEATURES_HINT.format(path=data_path))
    if kind == "inception" and not cfg.inception_weights:
        raise ConfigError("eval.features=inception needs eval.inception_weights (a local FID Inception-v3 file)")
    classifier = load_classifier(classifier_path) if classifier_path is not None else None
    if classifier is not None:
        expected = (info.channels, info.resolution)
        if (classifier.hparams["channels"], classifier.hparams["resolution"]) != expected:
            raise ConfigError(
                f"{classifier_path} was trained on {classifier.hparams['channels']}x{classifier.hparams['resolution']}"
                f" images but '{data_path}' holds {expected[0]}x{expected[1]}: retrain it with "
                + TRAIN_FEATURES_HINT.format(path=data_path))
        log.info("feature classifier %s", classifier_path)
    if kind == "classifier":
        return FeatureNet("classifier", classifier.feature_extractor(), classifier, file_digest(classifier_path))
    weights = Path(cfg.inception_weights)
    net = load_inception_features(weights, resize=cfg.resize)
    labels_from = [classifier_path] if classifier is not None else []  # its labels are cached too
    return FeatureNet("inception", net, classifier, f"{file_digest(weights, *labels_from)}-{cfg.resize}")


def ensure_feature_net(cfg: EvalConfig, data_path: str, info: DatasetInfo) -> Optional[dict]:
    """Train the data set's classifier (kept in its cache folder) on first use, when eval.features wants it and
    there is none yet (call on one process). Returns train-features' report, or None when nothing was trained."""
    wanted = cfg.features == "classifier" or (cfg.features == "auto" and not cfg.inception_weights)
    if not wanted or data_cache(data_path) is None or find_classifier(data_path) is not None:
        return None
    if not info.classes:
        raise ConfigError(
            f"eval.features={cfg.features}: '{data_path}' has no labels to train a feature classifier on; pass "
            f"eval.inception_weights (--inception-weights) a local copy of {INCEPTION_FILE} (pytorch-fid's FID "
            "Inception weights)")
    log.info("no feature classifier for %s yet: training it once (%d steps; kept at %s)", data_path,
             cfg.classifier_steps, classifier_target(data_path))
    report = train_feature_classifier(data_path, cfg.test_path, steps=cfg.classifier_steps, progress=True)
    log.info("feature classifier accuracy %.4f on %s", report["accuracy"], report["accuracy_on"])
    return report


# ---------------------------------------------------------------- train the classifier of a data set


def _labeled(stream: Iterator, where: str) -> Iterator[tuple[Tensor, Tensor]]:
    for images, labels in stream:
        if (labels < 0).any():
            raise DataError(f"{where}: some samples have no label (.cls); train-features needs labels on every sample")
        yield images, labels


class _InMemoryBatches:
    """Endless seeded random batches (uint8 images as float in [-1, 1], labels) from arrays held in memory."""

    def __init__(self, images, labels, batch: int, seed: int):
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels).long()
        self.batch, self.gen = min(batch, len(images)), torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            index = torch.randperm(len(self.images), generator=self.gen)[:self.batch]
            yield to_float(self.images[index]), self.labels[index]

    def close(self) -> None:
        pass


def train_feature_classifier(data: str, test_data: Optional[str] = None, steps: int = TRAIN_FEATURES_DEFAULTS["steps"],
                             batch: int = TRAIN_FEATURES_DEFAULTS["batch"], lr: float = TRAIN_FEATURES_DEFAULTS["lr"],
                             seed: int = 0, progress: bool = False) -> dict:
    """Train the feature classifier on the labeled shards in ``data``, save it in the data set's cache folder
    (``distgan.metrics.cache``), and report its accuracy.

    The accuracy is measured on ``test_data``, else ``DATA_test`` when it exists, else the last train shard
    (held out of training), else (one shard) a seeded fifth of its images, held out of training.
    """
    if not os.path.isdir(data):
        raise DataError(f"--data {data}: not a folder; train-features takes the folder python -m distgan.prepare "
                        "wrote")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: must be at least 1")
    data_cfg = DataConfig(path=data, num_workers=1)
    info = read_dataset_info(data)
    test_path = test_data or (data.rstrip("/") + "_test" if os.path.isdir(data.rstrip("/") + "_test") else None)
    if test_path:
        held_info, train_path, measured_on = read_dataset_info(test_path), data, f"test split {test_path}"
    elif len(info.shards) >= 2:
        held_info = dataclasses.replace(info, shards=info.shards[-1:], count=None)
        train_path, measured_on = "::".join(info.shards[:-1]), f"held-out train shard {info.shards[-1]}"
    else:  # one shard, no test split: a seeded share of its images is held out of training
        held_info, train_path = info, None
    held_images, held_labels = read_images(held_info, data_cfg, CLASSIFIER_EVAL_IMAGES if train_path else 1 << 62,
                                           seed=seed)
    if (held_labels < 0).any():
        raise DataError(f"{held_info.shards[0]}: samples without labels (.cls). train-features needs a labeled dataset; "
                        "without labels evaluate with --features inception --inception-weights FILE")
    num_classes = len(info.classes) if info.classes else int(held_labels.max()) + 1
    start = time.perf_counter()
    if train_path is None:
        held = min(CLASSIFIER_EVAL_IMAGES, max(1, len(held_images) // HELD_OUT_DIVISOR))
        train_images, train_labels = held_images[held:], held_labels[held:]
        held_images, held_labels = held_images[:held], held_labels[:held]
        measured_on = (f"{held} of the {held + len(train_images)} images of {info.shards[0]} held out of training "
                       f"(one shard and no test split; seed {seed})")
        log.info("feature classifier: %s", measured_on)
        stream = _InMemoryBatches(train_images, train_labels, batch, seed)
    else:
        stream = make_batch_iterator(dataclasses.replace(data_cfg, path=train_path), batch, 0, 1, seed)
    try:
        model = train_classifier(_labeled(stream, data), info.channels, info.resolution, num_classes, steps,
                                 lr=lr, seed=seed, progress=progress)
    finally:
        stream.close()
    images = to_float(torch.from_numpy(held_images))
    accuracy = evaluate_classifier(model, images, torch.from_numpy(held_labels))
    path = classifier_target(data)
    save_classifier(model, path, accuracy=accuracy)
    beside = Path(data) / CLASSIFIER_FILE
    if beside.is_file():
        log.warning("%s is read before the classifier just trained (%s): remove it to evaluate with the new one",
                    beside, path)
    log.info("feature classifier: accuracy %.4f on %d images of the %s; saved %s", accuracy, len(images),
             measured_on, path)
    return {"path": str(path), "accuracy": accuracy, "accuracy_on": measured_on, "accuracy_images": len(images),
            "num_classes": num_classes, "steps": steps, "seconds": round(time.perf_counter() - start, 1)}
