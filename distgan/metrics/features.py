"""The default feature network: a small classifier distgan trains on the labeled real data and keeps in the data
set's cache folder (distgan.metrics.cache). Its penultimate layer gives features, its logits give labels for mode coverage. Images are float
tensors [N, C, R, R] in [-1, 1]. (FID's Inception-v3 is in inception.py.)
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distgan import console
from distgan.errors import UserError

logger = logging.getLogger(__name__)

ARCH_VERSION = 1  # bump when FeatureClassifier's layers change; load_classifier refuses other versions
CLASSIFIER_FILE = "feature_classifier.safetensors"  # its file name in the data set's cache folder (+ .json beside it)


def extract_features(net: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """net(images) in batches, in eval mode without gradients, on net's device; float32 [N, D] on the CPU."""
    if len(images) == 0:
        raise ValueError("extract_features: got no images")
    device = next((p.device for p in net.parameters()), images.device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            outs = [net(images[i:i + batch].to(device, torch.float32)).float().cpu()
                    for i in range(0, len(images), batch)]
    finally:
        net.train(was_training)
    return torch.cat(outs).reshape(len(images), -1)


# ---------------------------------------------------------------- the classifier distgan trains


class FeatureClassifier(nn.Module):
    """A small conv net for 1- or 3-channel images at any resolution from 16 up (28, 32, 64, 128 ...).

    Conv-BN-ReLU-maxpool stages halve the image until it is about 8x8, a 4x4 adaptive average pool and a
    linear layer with ReLU give the ``feature_dim`` penultimate features, and a last linear layer the logits.
    The width (16, doubling per stage up to 64) was chosen to train to about 0.82 test accuracy on 3,000
    Fashion-MNIST images in 250 steps on 2 CPU cores.
    """

    def __init__(self, channels: int, resolution: int, num_classes: int, feature_dim: int = 128, width: int = 16):
        super().__init__()
        if channels not in (1, 3) or resolution < 16 or num_classes < 2:
            raise ValueError(
                f"FeatureClassifier: channels={channels} (1 or 3), resolution={resolution} (16 or more), "
                f"num_classes={num_classes} (2 or more)"
            )
        self.hparams = dict(channels=channels, resolution=resolution, num_classes=num_classes,
                            feature_dim=feature_dim, width=width)
        self.num_features = feature_dim  # torchmetrics reads this from a custom feature module
        self.accuracy: Optional[float] = None  # held-out accuracy, when known (saved beside the weights)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(max(2, round(math.log2(resolution / 8)))):
            c_out = min(width * 2 ** i, 4 * width)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(16 * c_in, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [N, feature_dim]."""
        c, r = self.hparams["channels"], self.hparams["resolution"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, r, r):
            raise ValueError(
                f"FeatureClassifier was trained on images [N, {c}, {r}, {r}] but got {tuple(x.shape)}: "
                "train a classifier for this dataset, or use eval.features=inception"
            )
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def feature_extractor(self) -> nn.Module:
        """A module whose forward gives the penultimate features (for extract_features or torchmetrics)."""
        return _PenultimateFeatures(self)


class _PenultimateFeatures(nn.Module):
    """A frozen view of a classifier's features: stays in eval mode (its BN uses the trained statistics)."""

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features
        self.eval()

    def train(self, mode: bool = True) -> "_PenultimateFeatures":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


def train_classifier(
    batches: Iterable[tuple[Tensor, Tensor]],
    channels: int,
    resolution: int,
    num_classes: int,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    threads: Optional[int] = 1,
    progress: bool = False,
) -> FeatureClassifier:
    """Train a FeatureClassifier for ``steps`` Adam steps (cosine-decayed lr) on (images, labels) batches.

    The initialisation is seeded with ``seed`` inside a forked RNG (the caller's global RNG is untouched), so
    the same batches give the same weights. ``batches`` must yield at least ``steps`` batches. ``threads``
    CPU threads are used meanwhile (then restored): one thread trained this small net 4x faster than two on
    the 2-core machine, and a fixed count keeps the CPU result independent of the caller's setting; None
    keeps torch's current setting.
    """
    if steps < 1:
        raise ValueError(f"train_classifier: steps={steps} must be at least 1")
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = FeatureClassifier(channels, resolution, num_classes)
        return _train(batches, model, steps, lr, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(batches: Iterable[tuple[Tensor, Tensor]], model: FeatureClassifier, steps: int, lr: float,
           progress: bool = False) -> FeatureClassifier:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    model.train()
    stream = iter(batches)
    for step in console.progress(range(steps), desc="feature classifier", unit="step", show=progress):
        try:
            images, labels = next(stream)
        except StopIteration:
            raise ValueError(
                f"train_classifier: the batches ran out after {step} of {steps} steps; "
                "pass an endless iterator (e.g. itertools.cycle over a loader) or fewer steps"
            ) from None
        if step == 0:
            model.to(images.device)
        loss = F.cross_entropy(model(images.float()), labels.long().to(images.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.debug("classifier step %d/%d loss %.4f", step + 1, steps, loss.item())
    return model.eval()


def classify(model: nn.Module, images: Tensor, batch: int = 512) -> Tensor:
    """Predicted labels [N] (argmax of the logits)."""
    return extract_features(model, images, batch).argmax(dim=1)


def evaluate_classifier(model: nn.Module, images: Tensor, labels: Tensor, batch: int = 512) -> float:
    """Accuracy of the model on (images, labels)."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"evaluate_classifier: {len(images)} images but {len(labels)} labels")
    return float((classify(model, images, batch) == labels.cpu().long()).float().mean())


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_classifier(model: FeatureClassifier, path: str | os.PathLike, accuracy: Optional[float] = None) -> None:
    """Weights as safetensors at ``path``, and a JSON beside it (same name, .json) with the architecture.

    Both are written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    accuracy = accuracy if accuracy is not None else model.accuracy
    meta = {"arch": "distgan.FeatureClassifier", "arch_version": ARCH_VERSION, **model.hparams, "accuracy": accuracy}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(weights, str(tmp), metadata={"arch_version": str(ARCH_VERSION)})
    os.replace(tmp, path)
    meta_tmp = path.with_name(path.name + ".json.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, _meta_path(path))


def load_classifier(path: str | os.PathLike) -> FeatureClassifier:
    """A FeatureClassifier from save_classifier's files, in eval mode on the CPU."""
    path = Path(path)
    meta_path = _meta_path(path)
    for needed in (path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"feature classifier file '{needed}' not found: it is written by save_classifier "
                f"(weights .safetensors plus a .json beside it); train one on the real data first"
            )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"'{meta_path}' is not valid JSON ({err}); re-save the classifier") from err
    if meta.get("arch_version") != ARCH_VERSION:
        raise UserError(
            f"'{meta_path}': arch_version {meta.get('arch_version')!r}, but this distgan builds version "
            f"{ARCH_VERSION}; retrain the classifier with this version"
        )
    try:
        model = FeatureClassifier(meta["channels"], meta["resolution"], meta["num_classes"],
                                  meta["feature_dim"], meta["width"])
        model.load_state_dict(load_file(str(path)))
    except (KeyError, RuntimeError) as err:
        raise UserError(f"'{path}' / '{meta_path}' do not describe a FeatureClassifier: {err}") from err
    model.accuracy = meta.get("accuracy")
    return model.eval()
