"""Feature networks for the metrics: a small classifier distgan trains on the real data, and FID's Inception-v3.

Images are float tensors [N, C, R, R] in [-1, 1]. The classifier is the default (its penultimate layer gives
features, its logits give labels for mode coverage); Inception-v3 gives standard, comparable FID figures but
needs a local weights file, since nothing can be downloaded here.
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

logger = logging.getLogger(__name__)

ARCH_VERSION = 1  # bump when FeatureClassifier's layers change; load_classifier refuses other versions
INCEPTION_DIM = 2048
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's (and torch-fidelity's) FID weights
CLASSIFIER_FILE = "feature_classifier.safetensors"  # suggested name beside the shards (+ .json beside it)


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
        return _train(batches, model, steps, lr)
    finally:
        torch.set_num_threads(previous_threads)


def _train(batches: Iterable[tuple[Tensor, Tensor]], model: FeatureClassifier, steps: int, lr: float
           ) -> FeatureClassifier:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    model.train()
    stream = iter(batches)
    for step in range(steps):
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
        raise ValueError(f"'{meta_path}' is not valid JSON ({err}); re-save the classifier") from err
    if meta.get("arch_version") != ARCH_VERSION:
        raise ValueError(
            f"'{meta_path}': arch_version {meta.get('arch_version')!r}, but this distgan builds version "
            f"{ARCH_VERSION}; retrain the classifier with this version"
        )
    try:
        model = FeatureClassifier(meta["channels"], meta["resolution"], meta["num_classes"],
                                  meta["feature_dim"], meta["width"])
        model.load_state_dict(load_file(str(path)))
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"'{path}' / '{meta_path}' do not describe a FeatureClassifier: {err}") from err
    model.accuracy = meta.get("accuracy")
    return model.eval()


# ---------------------------------------------------------------- FID Inception-v3 (pytorch-fid's variant)


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; named .conv/.bn as in the weights file."""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: Tensor, *layers: nn.Module) -> Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool(x: Tensor) -> Tensor:
    """TensorFlow's 3x3 average pool, which leaves the zero padding out of the average (the FID patch)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(c_in, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(c_in, c7, 1), _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(c_in, c7, 1), _Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **row), _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, *double), self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(c_in, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2), _chain(x, *seven),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    """The last blocks; the FID network's final one max-pools its pool branch (``max_pool=True``)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(c_in, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TensorFlow's FID graph (pytorch-fid's FIDInceptionA/C/E_1/E_2), up to the 2048-d pool.

    Takes images in [-1, 1], 1 or 3 channels, any size: grayscale is repeated to RGB and the image resized
    bilinearly to 299x299, as pytorch-fid does. Always in eval mode (its batch norms use the stored statistics).
    """

    def __init__(self):
        super().__init__()
        self.num_features = INCEPTION_DIM
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, max_pool=False), _InceptionE(2048, max_pool=True)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FIDInceptionV3 takes images [N, 1 or 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if tuple(x.shape[2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                   self.Mixed_7c)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception_features(weights_path: str | os.PathLike) -> FIDInceptionV3:
    """FIDInceptionV3 with the weights of a local pytorch-fid / torch-fidelity FID Inception file.

    The file is a plain state_dict loaded with weights_only=True (no pickled code). Its 1008-way 'fc' head is
    ignored (FID uses the pool features before it); BatchNorm 'num_batches_tracked' entries are optional.
    """
    path = Path(weights_path)
    expected_file = (f"the FID Inception-v3 weights ({INCEPTION_FILE} from pytorch-fid or torch-fidelity, "
                     "a plain state_dict)")
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights file '{path}' not found: expected {expected_file}. Download it on a machine with "
            "internet access and set eval.inception_weights to its local path, or use eval.features=classifier"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or pickled-code files
        raise ValueError(f"Inception weights file '{path}' could not be read with weights_only=True: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights file '{path}' holds a {type(state).__name__}, expected {expected_file}")
    model = FIDInceptionV3()
    wanted = model.state_dict()
    missing = sorted(k for k in wanted if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in wanted and not k.startswith("fc."))
    reshaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                for k, v in wanted.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"Inception weights file '{path}' does not match: expected {expected_file} with keys like "
            f"'Conv2d_1a_3x3.conv.weight'. Missing {len(missing)} keys {missing[:3]}, unexpected {len(unexpected)} "
            f"{unexpected[:3]}, wrong shape {len(reshaped)} {reshaped[:3]}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    return model.requires_grad_(False)
