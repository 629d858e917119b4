"""The Evaluator: how good a generator is, against real data, during training and after it.

Each rank generates its share of ``eval.n`` images from one global set of latents, computes features, and
the features are gathered; rank 0 computes the registered metrics (distgan.metrics.registry) against real
statistics that are read once (and cached beside the shards). Every figure has a real-vs-real reference
(train split vs test split), the floor a generator can reach on that figure.

Choices that make figures comparable and reproducible:
- The real images are a fixed sample (seed REAL_SEED, whatever the run seed): runs compare on the same set.
- Latents for all ``n`` images come from one generator seeded by the run seed; rank r takes a slice whose
  start is a multiple of the batch, so 1 and N processes push the very same batches through G and the
  feature net, and give the same figures. The slices are padded to equal size (accelerate's gather needs
  it) with copies of the last latent, which are dropped after the gather.
- Parzen (the 2014 paper's estimate) uses at most PARZEN_SAMPLES generated images and PARZEN_TEST test
  images, with sigma chosen on PARZEN_VALIDATION held-out train images (never among the real images used
  for the other statistics).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distgan.config import ConfigError, DataConfig, EvalConfig, validate_eval
from distgan.console import batches, progress

from distgan.data.shards import DatasetInfo, read_dataset_info, read_images, to_float
from distgan.metrics.feature_net import TRAIN_FEATURES_HINT, ensure_feature_net, load_feature_net
from distgan.metrics.features import CLASSIFIER_FILE
from distgan.metrics.frechet import load_reference_stats, save_reference_stats
from distgan.metrics.parzen import PARZEN_SAMPLES, PARZEN_TEST, PARZEN_VALIDATION
from distgan.metrics.registry import METRICS, Metric, MetricContext, names
from distgan.nn import sample_latent
from distgan.output import Output, OutputError

log = logging.getLogger(__name__)

REAL_SEED = 0  # the real sample does not depend on the run seed
CACHE_DIR = "eval_cache"  # beside the shards
CACHE_VERSION = 4  # 2: the test split's own labels; 3: the train images' own labels (per-class fd); 4: class logits


def default_test_path(cfg: EvalConfig, data_path: str) -> Optional[str]:
    """eval.test_path, else ``<data.path>_test`` when that folder exists, else None."""
    if cfg.test_path:
        return cfg.test_path
    candidate = data_path.rstrip("/") + "_test"
    return candidate if os.path.isdir(candidate) else None


class Evaluator:
    """Figures of a generator against real data; ``evaluate`` is collective (call it on every rank)."""

    def __init__(self, cfg: EvalConfig, data_cfg: DataConfig, info: DatasetInfo, device: torch.device,
                 seed: int, z_dist: str = "normal", num_classes: Optional[int] = None):
        """``num_classes``: the generator is class-conditional; the i-th image is generated for class i mod K."""
        validate_eval(cfg)  # a hand-built EvalConfig gets the checks a loaded config had
        self.cfg, self.data_cfg, self.info = cfg, data_cfg, info
        self.device, self.seed, self.z_dist = torch.device(device), seed, z_dist
        self.num_classes = num_classes
        self.metrics = list(cfg.metrics) or names()
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
        self._memo: dict = {}  # the metrics' own statistics of the real data (MetricContext.memo)
        self._reference: Optional[dict[str, float]] = None
        self._skip_warned: set[str] = set()
        self.last_modes_covered: Optional[int] = None
        self._check_metrics()
        if cfg.reference_stats:  # fd compares with these instead of the real features' own statistics
            dim = self._features(torch.zeros(2, info.channels, info.resolution, info.resolution))[0].shape[1]
            self._memo["fd_real_stats"] = load_reference_stats(Path(cfg.reference_stats), dim)

    def _check_metrics(self) -> None:
        no_test = (f"no test split (eval.test_path unset and no folder {self.data_cfg.path.rstrip('/')}_test): "
                   f"prepare one, e.g. python -m distgan.prepare fashion-mnist --split test --out "
                   f"{self.data_cfg.path.rstrip('/')}_test")
        for metric in self._metrics():
            title = metric.title or metric.name
            if metric.needs_labels and self.net.classifier is None:
                self._skip(metric.name, f"{title} needs the classifier {Path(self.data_cfg.path) / CLASSIFIER_FILE}: "
                           + TRAIN_FEATURES_HINT.format(path=self.data_cfg.path))
            if metric.needs_conditional and not self.num_classes:
                self._skip(metric.name, f"{title} skipped: the generator is not class-conditional "
                           "(generator.conditional=false)")
            if metric.needs_test_split and self.test_info is None:
                self._skip(metric.name, f"{title} skipped: {no_test}")
            if metric.needs_inception_logits and getattr(self.net.extractor, "fc", None) is None:
                self._skip(metric.name, f"{title} skipped: it needs Inception's logits, i.e. eval.features=inception "
                           "with pytorch-fid's .pth weights (which hold the 1008-way head); is_classifier scores "
                           "with the feature classifier instead")
        if self.test_info is None:
            self._skip("real-vs-real reference", "real-vs-real reference skipped: " + no_test)

    def _skip(self, what: str, message: str) -> None:
        if what not in self._skip_warned:
            log.warning(message)
            self._skip_warned.add(what)

    def _metrics(self) -> list[Metric]:
        """The metrics asked for (in registry order), less those skipped for want of a classifier or test split."""
        return [m for m in METRICS.values() if m.name in self.metrics and m.name not in self._skip_warned]

    def _needs_images(self) -> bool:
        return any(metric.needs_images for metric in self._metrics())

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
        images, true_train = read_images(self.info, self.data_cfg, want, REAL_SEED)
        n_val = PARZEN_VALIDATION if len(images) >= want else max(2, len(images) // 10)
        train = torch.from_numpy(images[:len(images) - n_val])
        true_train = true_train[:len(train)]
        if len(train) < self.cfg.n:
            log.warning("data.path %s has %d images: real statistics use %d (eval.n=%d) and %d held out for Parzen",
                        self.data_cfg.path, len(images), len(train), self.cfg.n, n_val)
        real = {"val_images": torch.from_numpy(images[len(images) - n_val:]).contiguous(),
                "train_parzen_images": train[:PARZEN_SAMPLES].contiguous()}
        real["train_features"], logits = self._features(to_float(train))
        if logits is not None:
            real["train_class_logits"], real["train_labels"] = logits, logits.argmax(1)
        if len(true_train) and (true_train >= 0).all():  # per-class fd compares each class with its real images
            real["train_true_labels"] = torch.from_numpy(true_train).long()
        if self.test_info is not None:
            test, true_labels = read_images(self.test_info, self.data_cfg, max(self.cfg.n, PARZEN_TEST), REAL_SEED)
            test = torch.from_numpy(test)
            real["test_features"], logits = self._features(to_float(test))
            if logits is not None:
                real["test_class_logits"], real["test_labels"] = logits, logits.argmax(1)
            if len(true_labels) and (true_labels >= 0).all():  # the class agreement floor: the classifier's accuracy
                real["test_true_labels"] = torch.from_numpy(true_labels).long()
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
        """Features (float32 [N, D], CPU) and classifier logits (float32 [N, K], or None) of images in [-1, 1]."""
        feats, labels = [], []
        for start in batches(len(images), self.cfg.batch, "real features"):
            f, y = self._batch_features(images[start:start + self.cfg.batch].to(self.device))
            feats.append(f.cpu())
            if y is not None:
                labels.append(y.cpu())
        return torch.cat(feats), (torch.cat(labels) if labels else None)

    def _batch_features(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Features and the classifier's logits (None without a classifier) of a batch in [-1, 1]."""
        classifier = self.net.classifier
        if self.net.kind == "classifier":
            f = classifier.features(x)
            return f.float(), classifier.head(f).float()
        f = self.net.extractor(x).float()
        return f, (classifier(x).float() if classifier is not None else None)

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

    def conditioned(self, n: int) -> Optional[Tensor]:
        """The class each of ``n`` generated images is made for (i mod K: balanced); None when unconditional."""
        return torch.arange(n) % self.num_classes if self.num_classes else None

    @torch.no_grad()
    def _generate(self, generator: nn.Module, rank: int, world_size: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        if not hasattr(generator, "z_dim"):
            raise TypeError(f"evaluate: {type(generator).__name__} has no z_dim; pass the unwrapped generator")
        z, per_rank, batch = self.latents(generator.z_dim, world_size)
        mine = z[rank * per_rank:(rank + 1) * per_rank]
        classes = self.conditioned(len(z))
        mine_y = classes[rank * per_rank:(rank + 1) * per_rank] if classes is not None else None
        feats, logits, images = [], [], []
        keep_images = self._needs_images()
        was_training = generator.training
        generator.eval()
        try:
            for start in batches(per_rank, batch, "evaluation: generating", show=rank == 0):
                z_batch = mine[start:start + batch].to(self.device)
                y_batch = () if mine_y is None else (mine_y[start:start + batch].to(self.device),)
                x = generator(z_batch, *y_batch).float().clamp_(-1.0, 1.0)
                if x.shape[1:] != (self.info.channels, self.info.resolution, self.info.resolution):
                    raise ValueError(f"evaluate: the generator makes {tuple(x.shape[1:])} images, the data "
                                     f"{self.info.channels}x{self.info.resolution}x{self.info.resolution}; a padded "
                                     "run's generator is passed cropped (distgan.nn.cropped)")
                f, y = self._batch_features(x)
                feats.append(f)
                if y is not None:
                    logits.append(y)
                if keep_images:
                    images.append(x)
        finally:
            generator.train(was_training)
        return (torch.cat(feats), torch.cat(logits) if logits else None, torch.cat(images) if images else None)

    def evaluate(self, generator: nn.Module, rank: int, world_size: int,
                 gather: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Generate this rank's share, gather, and (rank 0) compute the figures; other ranks return {}.

        ``generator`` makes images at the data's resolution: a run with data.pad passes its generator cropped
        (``distgan.nn.cropped``), so the feature network sees what it was trained on and figures compare with
        unpadded runs.

        Every rank must call it (``gather`` is a collective: accelerator.gather, or identity on one process).
        """
        start = time.perf_counter()
        feats, logits, images = self._generate(generator, rank, world_size)
        n = self.cfg.n
        feats = gather(feats.contiguous())[:n].cpu()
        logits = gather(logits.contiguous())[:n].cpu() if logits is not None else None
        images = gather(images.contiguous())[:n].cpu() if images is not None else None
        if rank != 0:
            return {}
        generated = time.perf_counter()
        if not bool(torch.isfinite(feats).all()) or (images is not None and not bool(torch.isfinite(images).all())):
            log.error("evaluation: the generated images or their features are not finite (did the generator diverge?)")
            return {key: math.nan for metric in self._metrics() for key in metric.figures}
        figures = self._figures(feats, logits, images, self.conditioned(n))
        if "modes_covered" in figures:
            self._watch_coverage(int(figures["modes_covered"]))
        log.info("evaluation of %d images: %.1f s generating + features, %.1f s metrics: %s", n, generated - start,
                 time.perf_counter() - generated, {k: round(v, 4) for k, v in figures.items()})
        return figures

    def _figures(self, feats: Tensor, class_logits: Optional[Tensor], images: Optional[Tensor],
                 conditioned: Optional[Tensor] = None) -> dict[str, float]:
        """The figures of a sample (generated, or the test split) against the real train statistics; ``class_logits``:
        the classifier's; ``conditioned``: the class each image was generated for (real images: their own labels)."""
        labels = class_logits.argmax(1) if class_logits is not None else None
        fc = getattr(self.net.extractor, "fc", None)
        ctx = MetricContext(features=feats, labels=labels, images=images, real=_Lazy(self.real_data),
                            conditioned=conditioned,
                            num_classes=self.net.classifier.hparams["num_classes"] if self.net.classifier else None,
                            seed=REAL_SEED, memo=self._memo, class_logits=class_logits, prdc_k=self.cfg.prdc_k,
                            logits=self.net.extractor.logits(feats) if fc is not None else None)
        out: dict[str, float] = {}
        for metric in progress(self._metrics(), desc="evaluation: metrics", unit="metric"):
            if ((metric.needs_labels and labels is None) or (metric.needs_images and images is None)
                    or (metric.needs_conditional and conditioned is None)):
                continue
            figures = metric.compute(ctx)
            missing = set(metric.figures) - set(figures)
            if missing:
                raise ValueError(f"metric {metric.name!r} did not compute {sorted(missing)}")
            out.update({key: float(figures[key]) for key in metric.figures})
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

        Image metrics (Parzen) put real train images in place of generated ones. Not collective: call it on
        rank 0 (it is computed once, then kept).
        """
        if self._reference is not None:
            return self._reference
        if self.test_info is None:
            return {}
        real = self.real_data()
        test_feats = real["test_features"][:self.cfg.n]
        test_logits = real["test_class_logits"][:self.cfg.n] if "test_class_logits" in real else None
        images = to_float(real["train_parzen_images"]) if self._needs_images() else None
        true_labels = real["test_true_labels"][:self.cfg.n] if "test_true_labels" in real else None
        self._reference = self._figures(test_feats, test_logits, images, true_labels)
        return self._reference


class _Lazy(Mapping):
    """The real data, computed on a metric's first look (none does with only fd and eval.reference_stats)."""

    def __init__(self, load: Callable[[], dict[str, Tensor]]):
        self._load, self._data = load, None

    def _get(self) -> dict[str, Tensor]:
        if self._data is None:
            self._data = self._load()
        return self._data

    def __getitem__(self, key: str) -> Tensor:
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _reference_stats_only(path: Path) -> None:
    """An existing --out is replaced only when it is reference statistics (an .npz with mu and sigma)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            ours = {"mu", "sigma"} <= set(data.files)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise OutputError(f"--out {path} exists and is not reference statistics (an .npz with mu and sigma); it was "
                          "kept: move it away or choose another --out")


def write_reference_stats(data_cfg: DataConfig, eval_cfg: EvalConfig, out: Path, device: torch.device) -> dict:
    """``python -m distgan.eval stats``: mu and sigma of eval.n real train images' features, pytorch-fid's layout."""
    info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
    ensure_feature_net(eval_cfg, data_cfg.path, info)
    evaluator = Evaluator(dataclasses.replace(eval_cfg, metrics=["fd"], reference_stats=None), data_cfg, info, device,
                          seed=0)
    features = evaluator.real_data()["train_features"]
    with Output(out, check=_reference_stats_only) as partial:  # distgan.output: never over another file
        save_reference_stats(partial, features)
    return {"stats": str(out), "images": len(features), "dim": int(features.shape[1]), "features": evaluator.net.kind,
            "data": data_cfg.path}


def evaluate_export(model: nn.Module, meta: dict, export: Path, data_cfg: DataConfig, eval_cfg: EvalConfig, seed: int,
                    device: torch.device) -> dict:
    """The figures of an exported generator (``model``, ``meta`` as load_generator_export gives them), the
    real-vs-real "reference" and a "meta" record: what ``python -m distgan.eval`` prints."""
    if not eval_cfg.metrics:
        eval_cfg = dataclasses.replace(eval_cfg, metrics=names())
    info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
    resolution = meta["resolution"] - 2 * meta.get("pad", 0)  # ``model`` comes cropped (load_generator_export)
    if (meta["channels"], resolution) != (info.channels, info.resolution):
        raise ConfigError(f"{export} makes {meta['channels']}x{resolution} images but {data_cfg.path} holds "
                          f"{info.channels}x{info.resolution}: pass --data with the run's data")
    trained = ensure_feature_net(eval_cfg, data_cfg.path, info)
    num_classes = len(meta["classes"]) if meta["generator"].get("conditional") else None
    evaluator = Evaluator(eval_cfg, data_cfg, info, device, seed, z_dist=meta["generator"]["z_dist"],
                          num_classes=num_classes)
    start = time.perf_counter()
    figures = evaluator.evaluate(model, rank=0, world_size=1, gather=lambda t: t)
    record: dict = dict(figures)
    reference = evaluator.reference()
    if reference:
        record["reference"] = reference
    record["meta"] = {"export": str(export), "step": meta.get("step"), "n": eval_cfg.n, "seed": seed,
                      "metrics": eval_cfg.metrics, "features": evaluator.net.kind, "data": data_cfg.path,
                      "test_data": evaluator.test_path, "reference_stats": eval_cfg.reference_stats,
                      "seconds": round(time.perf_counter() - start, 2)}
    if trained is not None:
        record["meta"]["feature_classifier_trained"] = trained
    return record
