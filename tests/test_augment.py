"""Differentiable augmentation (distgan/augment.py): each op's effect, its gradient, p, reproducibility, and ADA's p.

Float64 throughout: these check logic, not rounding.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distgan import augment as aug
from distgan.augment import Augmented, RealBatchMarker
from distgan.config import AugmentConfig, ConfigError, load_config
from distgan.losses import r1_penalty
from distgan.trainer import Trainer
from test_every_option import fast  # noqa: F401 (a fixture)
from tests.distributed.support import MemorySource

ALL = ["translation", "cutout", "color"]
OPS = {"brightness": aug.brightness, "saturation": aug.saturation, "contrast": aug.contrast,
       "translation": aug.translation, "cutout": aug.cutout}


def images(b: int = 8, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("name", OPS)
def test_op_keeps_the_shape_and_passes_gradients_to_its_input(name):
    x = images().requires_grad_(True)
    torch.manual_seed(1)
    out = OPS[name](x)
    assert out.shape == x.shape and out.dtype == x.dtype
    weights = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_brightness_adds_one_offset_per_image_within_half():
    x = images(b=64)
    torch.manual_seed(0)
    shift = aug.brightness(x) - x
    per_image = shift.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-12)
    assert per_image.abs().max() <= 0.5 and per_image[:, 0].std() > 0.2  # U(-0.5, 0.5): std 0.29


def test_saturation_keeps_the_grey_level_and_is_the_identity_on_one_channel():
    x = images(b=32)
    torch.manual_seed(0)
    out = aug.saturation(x)
    assert torch.allclose(out.mean(dim=1), x.mean(dim=1), atol=1e-12) and not torch.allclose(out, x)
    grey = images(c=1)
    assert torch.equal(aug.saturation(grey), grey)


def test_contrast_keeps_each_image_mean_and_scales_within_the_reference_range():
    x = images(b=64)
    torch.manual_seed(0)
    out = aug.contrast(x)
    assert torch.allclose(out.mean(dim=[1, 2, 3]), x.mean(dim=[1, 2, 3]), atol=1e-12)
    centred_in, centred_out = (t - t.mean(dim=[1, 2, 3], keepdim=True) for t in (x, out))
    factor = (centred_out.flatten(1) / centred_in.flatten(1))[:, 0]
    assert factor.min() >= 0.5 and factor.max() <= 1.5 and factor.max() - factor.min() > 0.5


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x moved by (dy, dx) pixels with zeros filled in (output pixel (i, j) = input (i + dy, j + dx))."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        x[..., max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def test_translation_moves_each_image_by_at_most_an_eighth_with_zero_fill():
    x = images(b=32, size=16)
    torch.manual_seed(0)
    out = aug.translation(x)
    limit = int(16 * aug.TRANSLATION_RATIO + 0.5)
    found = []
    for i in range(len(x)):
        shifts = [(dy, dx) for dy in range(-limit, limit + 1) for dx in range(-limit, limit + 1)
                  if torch.equal(out[i], shifted(x[i], dy, dx))]
        assert shifts, f"image {i} is not a translation of its input"
        found.append(shifts[0])
    assert len(set(found)) > 5, "every image got the same shift"


def test_cutout_zeroes_one_square_of_half_the_size():
    x = torch.ones(64, 1, 16, 16, dtype=torch.float64)
    torch.manual_seed(0)
    out = aug.cutout(x)
    side = int(16 * aug.CUTOUT_RATIO + 0.5)
    for image in out[:, 0]:
        rows, cols = (image == 0).nonzero(as_tuple=True)
        assert len(rows) > 0 and len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert rows.max() - rows.min() + 1 <= side and cols.max() - cols.min() + 1 <= side
    assert ((out == 0).flatten(1).sum(1) == side * side).any(), "no square was whole"


def test_p_zero_is_the_identity_and_its_gradient_too():
    x = images().requires_grad_(True)
    out = aug.augment(x, ALL, torch.tensor(0.0))
    assert torch.equal(out, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


def test_each_op_applies_to_a_share_p_of_the_images():
    x = images(b=4000, c=1, size=4)
    torch.manual_seed(0)
    changed = (aug.augment(x, ["color"], torch.tensor(0.3)) != x).flatten(1).any(1).double().mean()
    # color on one channel: brightness and contrast, each with p = 0.3: 1 - 0.7^2 = 0.51 of the images change
    assert abs(changed - 0.51) < 5 * (0.51 * 0.49 / 4000) ** 0.5


def test_a_seeded_call_repeats_and_another_seed_differs():
    x = images()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(aug.augment(x, ALL, 1.0))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


class Sum(nn.Module):
    """A 'discriminator' whose logits are a fixed number per image, or the sum of its pixels."""

    def __init__(self, logit: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.logit is not None:
            return self.weight * torch.full((len(x),), self.logit, dtype=torch.float64)
        return self.weight * x.flatten(1).sum(1)


def wrapper(inner: nn.Module, **overrides) -> Augmented:
    fields = {"policy": ALL, "p": 1.0, **overrides}
    return Augmented(inner, AugmentConfig(**fields)).double()


def test_the_penalty_gradient_is_taken_through_the_augmentation_on_the_input_given():
    """R1 w.r.t. the non-augmented image: with cutout only, d logit / d x is 0 under the square and 1 elsewhere;
    and the double backward reaches D's parameters."""
    D = wrapper(Sum(), policy=["cutout"])
    x = images(c=1).requires_grad_(True)
    torch.manual_seed(0)
    logits = D(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    assert set(grad.unique().tolist()) == {0.0, 1.0}
    torch.manual_seed(0)
    torch.rand(len(x), 1, 1, 1)  # augment() draws whether to apply the op first
    assert torch.equal(grad == 0, aug.cutout(torch.ones_like(x)) == 0)
    torch.manual_seed(0)
    r1_penalty(D(x), x).backward()
    assert D.inner.weight.grad is not None and D.inner.weight.grad != 0


def feed(D: Augmented, calls: int, batch: int = 8, real: bool = True) -> None:
    for _ in range(calls):
        if real:
            D.expect_real(batch)
        D(images(b=batch, c=1))


@pytest.mark.parametrize("logit, start, direction", [(3.0, 0.0, 1), (-3.0, 0.5, -1)], ids=["over-confident", "unsure"])
def test_ada_moves_p_by_the_papers_speed(logit, start, direction):
    """r_t = 1 (D says 'real' to every real image) > 0.6: p rises; r_t = -1: p falls; by images / (speed * 1000)."""
    D = wrapper(Sum(logit), p=start, adaptive=True, interval=4, speed_kimg=0.5)
    feed(D, 3)
    feed(D, 5, real=False)  # fake images: not counted
    assert D.p.item() == start and math.isnan(D.figures()["augment_rt"])
    feed(D, 1)
    assert D.rt.item() == (1.0 if logit > 0 else -1.0)
    assert D.p.item() == pytest.approx(start + direction * 4 * 8 / 500, abs=1e-6)
    D.requires_grad_(False)  # the G phase: D frozen, its calls are not counted either
    feed(D, 8)
    assert D.p.item() == pytest.approx(start + direction * 4 * 8 / 500, abs=1e-6)


def test_ada_counts_the_share_of_positive_real_logits():
    D = wrapper(Sum(), p=0.0, adaptive=True, interval=1, target=0.6)
    x = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    D.expect_real(4)
    D.eval()  # evaluation-mode calls are not counted
    D(x)
    assert math.isnan(D.figures()["augment_rt"])
    D.train()
    D(x)
    assert D.rt.item() == 0.5  # (3 - 1) / 4 < 0.6: p stays at its floor
    assert D.p.item() == 0.0


def test_ada_counts_only_the_real_head_of_a_joint_batch():
    """The D phase judges real and fake in one forward (distgan.objective): r_t sees the leading real images only."""
    D = wrapper(Sum(), p=0.0, interval=1)
    real = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    D.expect_real(len(real))
    D(torch.cat([real, -torch.ones(5, 1, 2, 2, dtype=torch.float64)]))  # 3 real (positive), 5 fake (negative)
    assert D.rt.item() == 1.0 and D.signs.tolist() == [0, 0]


def test_fixed_p_is_kept_and_r_t_still_measured():
    D = wrapper(Sum(2.0), p=0.7, interval=2)
    feed(D, 4)
    assert D.p.item() == pytest.approx(0.7) and D.rt.item() == 1.0


def test_p_and_the_counters_travel_with_the_state_dict():
    D = wrapper(Sum(2.0), p=0.0, adaptive=True, interval=3, speed_kimg=0.1)
    feed(D, 4)  # one update, one call into the next interval
    copy = wrapper(Sum(2.0), p=0.0, adaptive=True, interval=3, speed_kimg=0.1)
    copy.load_state_dict(D.state_dict())
    assert copy.p.item() == D.p.item() > 0
    feed(D, 2)
    feed(copy, 2)
    assert copy.p.item() == D.p.item() == pytest.approx(2 * 3 * 8 / 100, abs=1e-6)


def test_the_marker_flags_each_real_batch_as_it_is_drawn():
    class Source:
        resolution = 4

        def batches(self, *args):
            for _ in range(3):
                yield torch.zeros(5, 1, 4, 4), torch.zeros(5)

    D = wrapper(Sum(), interval=1)
    source = RealBatchMarker(Source(), D)
    assert source.resolution == 4
    stream = source.batches()
    assert not D._expect_real
    next(stream)
    assert D._expect_real == 5


@pytest.mark.parametrize("override, message", [
    ("augment.policy=[cutout,cutout]", "'augment.policy' = \\['cutout', 'cutout'\\]: name each op once"),
    ("augment.policy=[flip]", "'augment.policy\\[0\\]' = 'flip': expected one of"),
    ("augment.p=1.5", "'augment.p' = 1.5: must be in \\[0, 1\\]"),
    ("augment.target=1.0", "'augment.target' = 1.0: must be in \\[0, 1\\)"),
    ("augment.interval=0", "'augment.interval' = 0: must be at least 1"),
    ("augment.speed_kimg=0", "'augment.speed_kimg' = 0.0: must be positive"),
    ("augment.adaptive=true", "'augment.adaptive' = True with an empty augment.policy"),
])
def test_bad_augment_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- through the Trainer


def smoke(run_dir, *overrides: str, steps: int = 4):
    return load_config("smoke", [f"run.dir={run_dir}", f"train.steps={steps}", "log.every=1", "log.sample_every=1000",
                                 "checkpoint.every=2", "log.gif=false", "train.cpu_threads=1", *overrides])


def fit(cfg, resume=None) -> Trainer:
    trainer = Trainer(cfg, source=MemorySource(), resume=resume)
    trainer.fit()
    return trainer


def saved(run_dir, step: int, name: str = "D") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / f"{name}.safetensors"))


ADAPTIVE = ("augment.policy=[translation,cutout,color]", "augment.p=0", "augment.adaptive=true", "augment.interval=3",
            "augment.speed_kimg=0.1", "augment.target=0")  # a low target: D's first real logits lean positive, p rises


@pytest.mark.timeout(120)
def test_training_augments_every_d_forward_of_both_phases_and_logs_p(tmp_path, monkeypatch, fast):
    seen = []  # (D trainable, input needs grad) for every augmented call

    def counted(x, policy, p):
        seen.append((torch.is_grad_enabled() and any(q.requires_grad for q in trainer.D_plain.parameters()),
                     x.requires_grad))
        return augment(x, policy, p)

    augment = aug.augment
    monkeypatch.setattr(aug, "augment", counted)
    trainer = Trainer(smoke(tmp_path, *ADAPTIVE, "loss.penalty=r1"), source=MemorySource())
    trainer.fit()
    # per step: D(real) (R1: the real image needs grad), D(fake), then G's D(G(z)) with D frozen and grad to G
    assert seen == [(True, True), (True, False), (False, True)] * 4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [math.isnan(float(line["augment_rt"])) for line in lines] == [True, True, False, False]
    assert lines[0]["augment_p"] == 0.0 and lines[-1]["augment_p"] > 0 and lines[-1]["augment_rt"] > 0
    assert saved(tmp_path, 4)["p"] == lines[-1]["augment_p"]


@pytest.mark.timeout(120)
def test_p_zero_trains_as_without_augmentation_and_p_one_differently(tmp_path, fast):
    off = saved(fit(smoke(tmp_path / "off")).run_dir, 4)
    zero = saved(fit(smoke(tmp_path / "zero", "augment.policy=[translation,cutout,color]", "augment.p=0")).run_dir, 4)
    one = saved(fit(smoke(tmp_path / "one", "augment.policy=[translation,cutout,color]")).run_dir, 4)
    assert all(torch.equal(off[k], zero[f"inner.{k}"]) for k in off)
    assert not torch.equal(off["net.0.weight"], one["inner.net.0.weight"])


@pytest.mark.timeout(120)
def test_resume_with_adaptive_augmentation_is_bit_identical(tmp_path, fast):
    """2 steps, then resume to 4, equals 4 straight steps: weights, p and the ADA counters (the checkpoint falls
    inside an ADA interval of 3 D phases)."""
    fit(smoke(tmp_path / "split", *ADAPTIVE, steps=2), resume="auto")
    resumed = fit(smoke(tmp_path / "split", *ADAPTIVE), resume="auto")
    assert resumed.resumed_from.name == "step-00000002"
    fit(smoke(tmp_path / "straight", *ADAPTIVE))
    for name in ("G", "D"):
        a, b = saved(tmp_path / "split", 4, name), saved(tmp_path / "straight", 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert saved(tmp_path / "split", 4)["calls"] == 4 and saved(tmp_path / "split", 4)["p"] > 0

