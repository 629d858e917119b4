"""The Evaluator: how good a generator is, against real data, during training and after it.

Each rank generates its share of ``eval.n`` images from one global set of latents, computes features, and
the features are gathered; rank 0 computes the metrics of distgan.metrics against real statistics that are
read once (and cached beside the shards). Every figure has a real-vs-real reference (train split vs test
split), the floor a generator can reach on that figure.

Choices that make figures comparable and reproducible:
- The real images are a fixed sample (seed REAL_SEED, whatever the run seed): runs compare on the same set.
- Latents for all ``n`` images come from one generator seeded by the run seed; rank r takes a slice whose
  start is a multiple of the batch, so 1 and N processes push the very same batches through G and the
  feature net, and give the same figures. The slices are padded to equal size (accelerate's gather needs
  it) with copies of the last latent, which are dropped after the gather.
- Parzen (the 2014 paper's estimate) uses at most PARZEN_SAMPLES generated images and PARZEN_TEST test
  images, with sigma chosen on PARZEN_VALIDATION held-out train images (never among the real images used
  for the other statistics); the full 10k x 10k of the paper takes minutes on a CPU.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import DataConfig, ConfigError, EvalConfig
from .data.shards import DatasetInfo, read_dataset_info, read_shard
from .metrics import (
    class_coverage, feature_stats, frechet_distance, kernel_inception_distance, load_classifier,
    load_inception_features, parzen_log_likelihood, precision_recall, select_parzen_sigma,
)
from .metrics.features import CLASSIFIER_FILE, FeatureClassifier
from .nn import sample_latent

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("fd", "kid", "pr", "coverage", "parzen")
FIGURE_KEYS = {"fd": ("fd",), "kid": ("kid", "kid_std"), "pr": ("precision", "recall"),
               "coverage": ("modes_covered", "kl_to_real"), "parzen": ("parzen_ll", "parzen_se", "parzen_sigma")}
REAL_SEED = 0  # the real sample does not depend on the run seed
PARZEN_SAMPLES = 10_000  # generated images in the Parzen window (as the 2014 paper)
PARZEN_TEST = 1_000  # test images scored (the paper scored all 10,000)
PARZEN_VALIDATION = 1_000  # held-out train images that choose sigma
KID_SUBSETS, KID_SUBSET_SIZE, PR_K = 100, 1000, 3
CACHE_DIR = "eval_cache"  # beside the shards
CACHE_VERSION = 1
TRAIN_FEATURES_HINT = "python -m distgan.eval train-features --data {path}"


def default_test_path(cfg: EvalConfig, data_path: str) -> Optional[str]:
    """eval.test_path, else ``<data.path>_test`` when that folder exists, else None."""
    if cfg.test_path:
        return cfg.test_path
    candidate = data_path.rstrip("/") + "_test"
    return candidate if os.path.isdir(candidate) else None


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
    """Resolve eval.features (auto: the classifier beside the shards, else Inception when configured)."""
    classifier_path = Path(data_path) / CLASSIFIER_FILE
    have_classifier = os.path.isdir(data_path) and classifier_path.is_file()
    kind = cfg.features
    if kind == "auto":
        kind = "classifier" if have_classifier else "inception" if cfg.inception_weights else None
        if kind is None:
            raise ConfigError(
                f"eval.features=auto: no feature network for '{data_path}' (no {classifier_path} and no "
                f"eval.inception_weights). Train one: {TRAIN_FEATURES_HINT.format(path=data_path)}"
            )
    if kind not in ("classifier", "inception"):
        raise ConfigError(f"eval.features={cfg.features!r}: expected auto, classifier or inception")
    if kind == "classifier" and not have_classifier:
        raise ConfigError(f"eval.features=classifier: {classifier_path} not found. Train it: "
                          + TRAIN_FEATURES_HINT.format(path=data_path))
    if kind == "inception" and not cfg.inception_weights:
        raise ConfigError("eval.features=inception needs eval.inception_weights (a local FID Inception-v3 file)")
    classifier = load_classifier(classifier_path) if have_classifier else None
    if classifier is not None:
        expected = (info.channels, info.resolution)
        if (classifier.hparams["channels"], classifier.hparams["resolution"]) != expected:
            raise ConfigError(
                f"{classifier_path} was trained on {classifier.hparams['channels']}x{classifier.hparams['resolution']}"
                f" images but '{data_path}' holds {expected[0]}x{expected[1]}: retrain it with "
                + TRAIN_FEATURES_HINT.format(path=data_path))
    if kind == "classifier":
        return FeatureNet("classifier", classifier.feature_extractor(), classifier, file_digest(classifier_path))
    weights = Path(cfg.inception_weights)
    net = load_inception_features(weights)
    labels_from = [classifier_path] if classifier is not None else []  # its labels are cached too
    return FeatureNet("inception", net, classifier, file_digest(weights, *labels_from))


def read_images(info: DatasetInfo, data_cfg: DataConfig, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` distinct images (uint8 [N, C, R, R]) and labels (-1 unknown) from ``info``'s shards.

    Shards are read in an order shuffled by ``seed`` until ``n`` images are in hand, then the images are
    shuffled by ``seed``: a deterministic sample, whatever the process count. (The training stream is not
    used: its blocks repeat samples when n exceeds a block.)
    """
    rng = np.random.default_rng([seed, 1])
    images, labels, have = [], [], 0
    for index in rng.permutation(len(info.shards)):
        shard = read_shard(info.shards[index], resolution=info.resolution, channels=info.channels,
                           skip_bad=data_cfg.skip_bad_samples, allow_pipe=data_cfg.allow_pipe)
        images.append(shard.images)
        labels.append(shard.labels)
        have += len(shard.labels)
        if have >= n:
            break
    if have == 0:
        raise ConfigError(f"no images in the shards of {info.shards[0]} ...: cannot compute real statistics")
    order = rng.permutation(have)[:n]
    return np.concatenate(images)[order], np.concatenate(labels)[order]


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], as the training stream gives them."""
    return images.float() / 127.5 - 1.0


class Evaluator:
    """Figures of a generator against real data; ``evaluate`` is collective (call it on every rank)."""

    def __init__(self, cfg: EvalConfig, data_cfg: DataConfig, info: DatasetInfo, device: torch.device,
                 seed: int, z_dist: str = "normal"):
        if cfg.n < 2 or cfg.batch < 1:
            raise ConfigError(f"eval.n={cfg.n} and eval.batch={cfg.batch}: need n >= 2 and batch >= 1")
        self.cfg, self.data_cfg, self.info = cfg, data_cfg, info
        self.device, self.seed, self.z_dist = torch.device(device), seed, z_dist
        self.metrics = list(cfg.metrics) or list(DEFAULT_METRICS)
        self.net = load_feature_net(cfg, data_cfg.path, info)
        self.net.extractor.to(self.device)
        if self.net.classifier is not None:
            self.net.classifier.to(self.device)
        self.test_path = default_test_path(cfg, data_cfg.path)
        self.test_info = read_dataset_info(self.test_path, allow_pipe=data_cfg.allow_pipe) if self.test_path else None
        if self.test_info and (self.test_info.resolution, self.test_info.channels) != (info.resolution, info.channels):
            raise ConfigError(f"test split '{self.test_path}' holds {self.test_info.channels}x{self.test_info.resolution} "
                              f"images but data.path holds {info.channels}x{info.resolution}: fix eval.test_path")
        self._real: Optional[dict[str, Tensor]] = None
        self._real_stats: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._reference: Optional[dict[str, float]] = None
        self._skip_warned: set[str] = set()
        self.last_modes_covered: Optional[int] = None
        self._check_metrics()

    def _check_metrics(self) -> None:
        if "coverage" in self.metrics and self.net.classifier is None:
            self._skip("coverage", f"coverage needs the classifier {Path(self.data_cfg.path) / CLASSIFIER_FILE}: "
                       + TRAIN_FEATURES_HINT.format(path=self.data_cfg.path))
        if self.test_info is None:
            fix = (f"no test split (eval.test_path unset and no folder {self.data_cfg.path.rstrip('/')}_test): "
                   f"prepare one, e.g. python -m distgan.prepare fashion-mnist --split test --out "
                   f"{self.data_cfg.path.rstrip('/')}_test")
            if "parzen" in self.metrics:
                self._skip("parzen", "Parzen log-likelihood skipped: " + fix)
            self._skip("reference", "real-vs-real reference skipped: " + fix)

    def _skip(self, what: str, message: str) -> None:
        if what not in self._skip_warned:
            log.warning(message)
            self._skip_warned.add(what)

    def _wants(self, metric: str) -> bool:
        return metric in self.metrics and metric not in self._skip_warned

    # ------------------------------------------------------------------ real data (rank 0, once)

    def _cache_path(self) -> Optional[Path]:
        if not os.path.isdir(self.data_cfg.path):
            return None
        parts = [f"v{CACHE_VERSION}", self.net.kind, self.net.digest, f"n{self.cfg.n}", f"seed{REAL_SEED}",
                 f"parzen{PARZEN_SAMPLES}-{PARZEN_TEST}-{PARZEN_VALIDATION}"]
        for shard in list(self.info.shards) + (list(self.test_info.shards) if self.test_info else ["no-test"]):
            stat = os.stat(shard) if os.path.isfile(shard) else None
            parts.append(f"{shard}:{stat.st_size}:{stat.st_mtime_ns}" if stat else shard)
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]
        return Path(self.data_cfg.path) / CACHE_DIR / f"real-{self.net.kind}-n{self.cfg.n}-{key}.safetensors"

    def real_data(self) -> dict[str, Tensor]:
        """Features, classifier labels and the Parzen image sets of the real train (and test) images."""
        if self._real is not None:
            return self._real
        path = self._cache_path()
        if path is not None and path.is_file():
            try:
                self._real = load_file(str(path))
                log.info("real statistics from %s", path)
                return self._real
            except Exception as err:  # unreadable or torn: recompute and rewrite it
                log.warning("real statistics cache %s unreadable (%s); recomputing", path, err)
        start = time.perf_counter()
        want = self.cfg.n + PARZEN_VALIDATION
        images, _ = read_images(self.info, self.data_cfg, want, REAL_SEED)
        n_val = PARZEN_VALIDATION if len(images) >= want else max(2, len(images) // 10)
        train = torch.from_numpy(images[:len(images) - n_val])
        if len(train) < self.cfg.n:
            log.warning("data.path %s has %d images: real statistics use %d (eval.n=%d) and %d held out for Parzen",
                        self.data_cfg.path, len(images), len(train), self.cfg.n, n_val)
        real = {"val_images": torch.from_numpy(images[len(images) - n_val:]).contiguous(),
                "train_parzen_images": train[:PARZEN_SAMPLES].contiguous()}
        real["train_features"], labels = self._features(to_float(train))
        if labels is not None:
            real["train_labels"] = labels
        if self.test_info is not None:
            test, _ = read_images(self.test_info, self.data_cfg, max(self.cfg.n, PARZEN_TEST), REAL_SEED)
            test = torch.from_numpy(test)
            real["test_features"], labels = self._features(to_float(test))
            if labels is not None:
                real["test_labels"] = labels
            real["test_parzen_images"] = test[:PARZEN_TEST].contiguous()
        self._real = real
        log.info("real statistics: %d train, %s test images in %.1f s", len(train),
                 len(real["test_features"]) if "test_features" in real else "no", time.perf_counter() - start)
        if path is not None:
            self._save_cache(path, real)
        return real

    @staticmethod
    def _save_cache(path: Path, real: dict[str, Tensor]) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in real.items()}, str(tmp))
            tmp.chmod(0o644)  # a shared data folder: other users may read it
            os.replace(tmp, path)
        except OSError as err:  # a read-only data folder: the cache only saves time
            log.info("real statistics not cached at %s: %s", path, err)
            tmp.unlink(missing_ok=True)

    @torch.no_grad()
    def _features(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Features (float32 [N, D], CPU) and classifier labels (int64 [N], or None) of images in [-1, 1]."""
        feats, labels = [], []
        for start in range(0, len(images), self.cfg.batch):
            f, y = self._batch_features(images[start:start + self.cfg.batch].to(self.device))
            feats.append(f.cpu())
            if y is not None:
                labels.append(y.cpu())
        return torch.cat(feats), (torch.cat(labels) if labels else None)

    def _batch_features(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        classifier = self.net.classifier
        if self.net.kind == "classifier":
            f = classifier.features(x)
            return f.float(), classifier.head(f).argmax(1)
        f = self.net.extractor(x).float()
        return f, (classifier(x).argmax(1) if classifier is not None else None)

    # ------------------------------------------------------------------ generated images

    def latents(self, z_dim: int, world_size: int) -> tuple[Tensor, int, int]:
        """(all latents padded to world_size * per_rank, per_rank, batch); the same first n for any world size."""
        n = self.cfg.n
        batch = min(self.cfg.batch, n)
        per_rank = math.ceil(n / (world_size * batch)) * batch
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 0xE7A1]).generate_state(1)[0]))
        z = sample_latent(n, z_dim, self.z_dist, gen)
        pad = z[-1:].expand(world_size * per_rank - n, -1)
        return torch.cat([z, pad]), per_rank, batch

    @torch.no_grad()
    def _generate(self, generator: nn.Module, rank: int, world_size: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        if not hasattr(generator, "z_dim"):
            raise TypeError(f"evaluate: {type(generator).__name__} has no z_dim; pass the unwrapped generator")
        z, per_rank, batch = self.latents(generator.z_dim, world_size)
        mine = z[rank * per_rank:(rank + 1) * per_rank]
        feats, labels, images = [], [], []
        was_training = generator.training
        generator.eval()
        try:
            for start in range(0, per_rank, batch):
                x = generator(mine[start:start + batch].to(self.device)).float().clamp_(-1.0, 1.0)
                f, y = self._batch_features(x)
                feats.append(f)
                if y is not None:
                    labels.append(y)
                if self._wants("parzen"):
                    images.append(x)
        finally:
            generator.train(was_training)
        return (torch.cat(feats), torch.cat(labels) if labels else None, torch.cat(images) if images else None)

    def evaluate(self, generator: nn.Module, rank: int, world_size: int,
                 gather: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Generate this rank's share, gather, and (rank 0) compute the figures; other ranks return {}.

        Every rank must call it (``gather`` is a collective: accelerator.gather, or identity on one process).
        """
        start = time.perf_counter()
        feats, labels, images = self._generate(generator, rank, world_size)
        n = self.cfg.n
        feats = gather(feats.contiguous())[:n].cpu()
        labels = gather(labels.contiguous())[:n].cpu() if labels is not None else None
        images = gather(images.contiguous())[:min(n, PARZEN_SAMPLES)].cpu() if images is not None else None
        if rank != 0:
            return {}
        generated = time.perf_counter()
        if not bool(torch.isfinite(feats).all()) or (images is not None and not bool(torch.isfinite(images).all())):
            log.error("evaluation: the generated images or their features are not finite (did the generator diverge?)")
            return {key: math.nan for m in self.metrics if self._wants(m) for key in FIGURE_KEYS[m]}
        figures = self._figures(feats, labels, images)
        if "modes_covered" in figures:
            self._watch_coverage(int(figures["modes_covered"]))
        log.info("evaluation of %d images: %.1f s generating + features, %.1f s metrics: %s", n, generated - start,
                 time.perf_counter() - generated, {k: round(v, 4) for k, v in figures.items()})
        return figures

    def _figures(self, feats: Tensor, labels: Optional[Tensor], images: Optional[Tensor]) -> dict[str, float]:
        """The figures of a sample (generated, or the test split) against the real train statistics."""
        real = self.real_data()
        out: dict[str, float] = {}
        if self._wants("fd"):
            if self._real_stats is None:
                self._real_stats = feature_stats(real["train_features"])
            mu, sigma = feature_stats(feats)
            out["fd"] = frechet_distance(*self._real_stats, mu, sigma)
        if self._wants("kid"):
            # subsets as large as both sets are all the same set: one is enough (and its std is 0)
            whole = len(real["train_features"]) == len(feats) <= KID_SUBSET_SIZE
            out["kid"], out["kid_std"] = kernel_inception_distance(
                real["train_features"], feats, 1 if whole else KID_SUBSETS, KID_SUBSET_SIZE, seed=REAL_SEED)
        if self._wants("pr"):
            pr = precision_recall(real["train_features"], feats, k=PR_K)
            out["precision"], out["recall"] = pr["precision"], pr["recall"]
        if self._wants("coverage") and labels is not None:
            num_classes = self.net.classifier.hparams["num_classes"]
            hist = torch.bincount(real["train_labels"], minlength=num_classes)
            cov = class_coverage(labels, num_classes, real_hist=hist)
            out["modes_covered"], out["kl_to_real"] = float(cov["modes_covered"]), cov["kl_to_real"]
        if self._wants("parzen") and images is not None:
            val = to_float(real["val_images"])
            sigma = select_parzen_sigma(images, val)
            test = to_float(real["test_parzen_images"])
            out["parzen_ll"], out["parzen_se"] = parzen_log_likelihood(images, test, sigma)
            out["parzen_sigma"] = sigma
        return out

    def _watch_coverage(self, modes: int) -> None:
        num_classes = self.net.classifier.hparams["num_classes"]
        previous = self.last_modes_covered
        if modes < num_classes or (previous is not None and modes < previous):
            log.warning("mode collapse? the samples cover %d of %d classes (previous evaluation: %s)",
                        modes, num_classes, previous if previous is not None else "none")
        self.last_modes_covered = modes

    def reference(self) -> dict[str, float]:
        """Real-vs-real figures (test split against the train statistics): the floor; {} without a test split.

        Not collective: call it on rank 0 (it is computed once, then kept).
        """
        if self._reference is not None:
            return self._reference
        if self.test_info is None:
            return {}
        real = self.real_data()
        test_feats = real["test_features"][:self.cfg.n]
        test_labels = real["test_labels"][:self.cfg.n] if "test_labels" in real else None
        figures = self._figures(test_feats, test_labels, None)
        if self._wants("parzen"):  # train images in the window, scored on the test split
            samples = to_float(real["train_parzen_images"])
            sigma = select_parzen_sigma(samples, to_float(real["val_images"]))
            figures["parzen_ll"], figures["parzen_se"] = parzen_log_likelihood(
                samples, to_float(real["test_parzen_images"]), sigma)
            figures["parzen_sigma"] = sigma
        self._reference = figures
        return figures
