"""The GAN learns: 1,000 real Fashion-MNIST steps move G_ema's samples towards the data.

Plumbing tests (files written, finite losses, bit-identical resume) all pass for a trainer that never
steps its optimizers; this one does not. A small DCGAN trains 1,000 steps (batch 32) on 1,000 real images; its samples
are scored by the Frechet distance in the feature space of a small classifier trained here on other real
images (distgan's own feature network, as ``distgan.eval`` uses), against 1,000 real test images.

Mutations run by hand once, each with this test as it stands (FD of G_ema after 1,000 steps / at step 0):
- unmutated: 67 / 561 (an untrained G with another seed: 561 too; an untrained DCGAN G draws near-constant
  grey images, so any seed scores alike)
- ``optimizer.step()`` replaced by ``pass`` in the trainer: fails at "G did not move" (FD would be 561)
- the G loss sign flipped (non-saturating ``generator_loss`` returns ``-softplus(-l)``): FD 705, fails
  "not well below step 0"
- EMA never updates (``EMA.update`` returns before copying): FD 561, fails "not well below step 0"
The threshold (FD at most a quarter of the step-0 value and of the other untrained G) sits far from both
sides of these figures; they are statistics of 1,000 samples, not rounding-level quantities, so they do not
depend on the CPU. One thread (``train.cpu_threads=1``): this small model is not faster on more, and the
test then runs the same on any core count. About 25 s on a quiet 2-core machine.
"""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from conftest import FASHION_DIR, require_fashion_mnist
from distgan.config import load_config
from distgan.metrics import extract_features, frechet_distance_from_features, train_classifier
from distgan.nn import build_generator, sample_latent
from distgan.trainer import Trainer

STEPS = 1000
N_EVAL = 1000


def _idx(name: str, count: int, offset: int = 0) -> np.ndarray:
    with gzip.open(FASHION_DIR / name) as f:
        data = f.read()
    if "images" in name:
        flat = np.frombuffer(data, np.uint8, offset=16)
        return flat[offset * 784:(offset + count) * 784].reshape(count, 1, 28, 28)
    return np.frombuffer(data, np.uint8, offset=8)[offset:offset + count]


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)


@pytest.fixture(scope="module")
def feature_net():
    """A small classifier on 3,000 real training images not in the GAN's 1,000 (its penultimate layer)."""
    require_fashion_mnist()
    x = _to_float(_idx("train-images-idx3-ubyte.gz", 3000, offset=10000))
    y = torch.from_numpy(_idx("train-labels-idx1-ubyte.gz", 3000, offset=10000).astype(np.int64))
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x) - 63, 64):
                yield x[order[i:i + 64]], y[order[i:i + 64]]

    return train_classifier(batches(), channels=1, resolution=28, num_classes=10, steps=250, lr=3e-3).feature_extractor()


@pytest.fixture(scope="module")
def real_features(feature_net):
    return extract_features(feature_net, _to_float(_idx("t10k-images-idx3-ubyte.gz", N_EVAL)))


def _fd(generator: torch.nn.Module, z_dim: int, feature_net, real_features) -> float:
    z = sample_latent(N_EVAL, z_dim, "normal", torch.Generator().manual_seed(123))
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(z).float()
    generator.train(was_training)
    return frechet_distance_from_features(real_features, extract_features(feature_net, images))


def _moved(before: dict, module: torch.nn.Module) -> float:
    """Relative change of all floating-point parameters together."""
    after = dict(module.named_parameters())
    diff = sum(((after[k].detach().double() - v.double()) ** 2).sum() for k, v in before.items())
    base = sum((v.double() ** 2).sum() for v in before.values())
    return float((diff / base).sqrt())


@pytest.mark.timeout(600)
def test_g_ema_moves_towards_the_data(fashion_shards, tmp_path, feature_net, real_features):
    cfg = load_config("smoke", [
        f"data.path={fashion_shards}", f"run.dir={tmp_path / 'run'}", f"train.steps={STEPS}", "train.batch_size=32",
        "generator.width=16", "generator.z_dim=32", "discriminator.width=16", "log.every=100",
        "log.sample_every=10000", "checkpoint.every=10000", "log.gif=false", "ema.half_life_kimg=0.5", "train.cpu_threads=1",
    ])
    trainer = Trainer(cfg)
    g_before = {k: v.detach().clone() for k, v in trainer.G_plain.named_parameters()}
    d_before = {k: v.detach().clone() for k, v in trainer.D_plain.named_parameters()}
    fd_start = _fd(trainer.ema.model, cfg.generator.z_dim, feature_net, real_features)
    torch.manual_seed(cfg.run.seed + 1)
    other = build_generator(cfg.generator, 28, 1)
    fd_other = _fd(other, cfg.generator.z_dim, feature_net, real_features)

    trainer.fit()
    trainer.close()

    assert _moved(g_before, trainer.G_plain) > 0.01, "G did not move"
    assert _moved(d_before, trainer.D_plain) > 0.01, "D did not move"
    fd_end = _fd(trainer.ema.model, cfg.generator.z_dim, feature_net, real_features)
    print(f"FD of G_ema: step 0 {fd_start:.1f}, step {STEPS} {fd_end:.1f}; untrained G (other seed) {fd_other:.1f}")
    assert fd_end < fd_start / 4, f"FD {fd_end:.1f} after {STEPS} steps not well below step 0's {fd_start:.1f}"
    assert fd_end < fd_other / 4, f"FD {fd_end:.1f} not well below an untrained G's {fd_other:.1f}"
