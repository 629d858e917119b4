"""Adversarial losses against hand-computed values; penalties on linear discriminators with known gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distgan.losses import (
    LOSS_KINDS, discriminator_loss, generator_loss, input_grad_sq_norm, interpolate, penalty_weight, r1_penalty,
    wgan_gp_penalty,
)

REAL = torch.tensor([0.0, 3.0])
FAKE = torch.tensor([-1.0, 2.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


D_EXPECTED = {
    # BCE: -log sigmoid(r) = softplus(-r); -log(1 - sigmoid(f)) = softplus(f)
    "minimax": (softplus(0) + softplus(-3)) / 2 + (softplus(-1) + softplus(2)) / 2,
    "non-saturating": (softplus(0) + softplus(-3)) / 2 + (softplus(-1) + softplus(2)) / 2,
    "hinge": (1.0 + 0.0) / 2 + (0.0 + 3.0) / 2,  # relu(1 - r), relu(1 + f)
    "wasserstein": 0.5 - 1.5,  # mean(f) - mean(r)
    "least-squares": 0.5 * (1.0 + 4.0) / 2 + 0.5 * (1.0 + 4.0) / 2,  # 0.5 (r - 1)^2 + 0.5 f^2
}
G_EXPECTED = {
    "minimax": -(softplus(-1) + softplus(2)) / 2,  # log(1 - sigmoid(f))
    "non-saturating": (softplus(1) + softplus(-2)) / 2,  # -log sigmoid(f)
    "hinge": -0.5,
    "wasserstein": -0.5,
    "least-squares": 0.5 * (4.0 + 1.0) / 2,  # 0.5 (f - 1)^2
}


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_discriminator_loss_values(kind: str) -> None:
    assert discriminator_loss(kind, REAL, FAKE).item() == pytest.approx(D_EXPECTED[kind], rel=1e-6)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_generator_loss_values(kind: str) -> None:
    assert generator_loss(kind, FAKE).item() == pytest.approx(G_EXPECTED[kind], rel=1e-6)


def test_bce_losses_match_torch_bce() -> None:
    expected = F.binary_cross_entropy_with_logits(REAL, torch.ones(2)) + F.binary_cross_entropy_with_logits(FAKE, torch.zeros(2))
    assert discriminator_loss("non-saturating", REAL, FAKE).item() == pytest.approx(expected.item(), rel=1e-6)
    ns = F.binary_cross_entropy_with_logits(FAKE, torch.ones(2))
    assert generator_loss("non-saturating", FAKE).item() == pytest.approx(ns.item(), rel=1e-6)
    # the saturating loss is minus the BCE of fakes labelled fake
    sat = -F.binary_cross_entropy_with_logits(FAKE, torch.zeros(2))
    assert generator_loss("minimax", FAKE).item() == pytest.approx(sat.item(), rel=1e-6)


def test_losses_are_fp32_for_half_logits() -> None:
    out = discriminator_loss("hinge", REAL.half(), FAKE.half())
    assert out.dtype == torch.float32 and out.item() == pytest.approx(D_EXPECTED["hinge"])


def test_unknown_kinds_list_valid_ones() -> None:
    """Choices are checked once, by the config (the loss functions trust a validated config)."""
    from distgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="non-saturating"):
        load_config(None, ["loss.kind=vanilla"])
    with pytest.raises(ConfigError, match="least-squares"):
        load_config(None, ["loss.kind=lsgan"])
    with pytest.raises(ConfigError, match="wgan-gp"):
        load_config(None, ["loss.penalty=r3"])


def _linear_d(w: torch.Tensor) -> nn.Module:
    d = nn.Sequential(nn.Flatten(), nn.Linear(w.numel(), 1))
    with torch.no_grad():
        d[1].weight.copy_(w.reshape(1, -1))
        d[1].bias.fill_(0.7)
    return d


def test_r1_of_linear_d_is_squared_weight_norm() -> None:
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    d = _linear_d(w)
    x = torch.randn(5, 1, 2, 2, requires_grad=True)
    logits = d(x).squeeze(1)
    per_sample = input_grad_sq_norm(logits, x)
    assert per_sample.shape == (5,)
    assert torch.allclose(per_sample, torch.full((5,), 14.25))
    penalty = r1_penalty(logits, x)
    assert penalty.item() == pytest.approx(14.25)
    penalty.backward()  # double backward: d|w|^2/dw = 2w
    assert torch.allclose(d[1].weight.grad, 2 * w.reshape(1, -1))
    assert d[1].bias.grad is None or d[1].bias.grad.abs().max() == 0


def test_wgan_gp_of_linear_d_with_norm_two_is_one() -> None:
    w = torch.tensor([0.0, 2.0 * 0.6, 2.0 * 0.8, 0.0])  # |w| = 2
    d = _linear_d(w)
    x_hat = interpolate(torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2))
    penalty = wgan_gp_penalty(d(x_hat).squeeze(1), x_hat)
    assert penalty.item() == pytest.approx(1.0)
    penalty.backward()  # d(|w| - 1)^2/dw = 2(|w| - 1) w/|w| = w
    assert torch.allclose(d[1].weight.grad, w.reshape(1, -1), atol=1e-6)


def test_grad_scale_gives_the_unscaled_penalty() -> None:
    torch.manual_seed(0)
    d = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1))
    x = torch.randn(4, 2, 2, 2, requires_grad=True)
    logits = d(x).squeeze(1)
    plain = r1_penalty(logits, x)
    scaled = r1_penalty(logits, x, grad_scale=1024.0)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-6)
    gp_plain, gp_scaled = wgan_gp_penalty(logits, x), wgan_gp_penalty(logits, x, grad_scale=1024.0)
    assert gp_scaled.item() == pytest.approx(gp_plain.item(), rel=1e-6)


def test_grad_scale_rescues_fp16_gradients_from_underflow() -> None:
    """d/dx of (x * 2^-13 * 2^-13) is 2^-26: zero in fp16 unless the outputs are scaled first (AMP recipe)."""
    x = torch.ones(2, 4, dtype=torch.float16, requires_grad=True)
    small = torch.tensor(2.0**-13, dtype=torch.float16)
    logits = ((x * small) * small).sum(dim=1)
    assert r1_penalty(logits, x).item() == 0.0
    assert r1_penalty(logits, x, grad_scale=1024.0).item() == pytest.approx(4 * 2.0**-52, rel=1e-6)


def test_penalty_needs_inputs_that_require_grad() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires_grad_"):
        r1_penalty(x.sum(1), x)


def test_interpolate_is_per_sample_and_between_endpoints() -> None:
    real, fake = torch.zeros(64, 3, 4, 4), torch.ones(64, 3, 4, 4)
    x_hat = interpolate(real, fake, generator=torch.Generator().manual_seed(1))
    assert x_hat.requires_grad and x_hat.grad_fn is None  # a leaf: the penalty's gradient stops here
    one_minus_alpha = x_hat.flatten(1)
    assert torch.all(one_minus_alpha == one_minus_alpha[:, :1])  # one alpha per sample
    assert one_minus_alpha.min() >= 0 and one_minus_alpha.max() <= 1
    assert one_minus_alpha[:, 0].std() > 0.1  # different per sample
    again = interpolate(real, fake, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_hat, again)


def test_penalty_weight_arithmetic() -> None:
    assert penalty_weight("r1", 10.0, 1) == 5.0
    assert penalty_weight("r2", 10.0, 16) == 80.0
    assert penalty_weight("wgan-gp", 10.0, 1) == 10.0
    assert penalty_weight("wgan-gp", 10.0, 4) == 40.0
    assert penalty_weight("none", 10.0, 4) == 0.0
    from distgan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="penalty_interval"):
        load_config(None, ["loss.penalty_interval=0"])
