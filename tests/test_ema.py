"""EMA: beta arithmetic, parameter averaging, buffer copying, state round trip, spectral norm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distgan.config import DiscriminatorConfig, EMAConfig, GeneratorConfig
from distgan.ema import EMA
from distgan.nn import build_discriminator, build_generator


def _small_g() -> nn.Module:
    torch.manual_seed(0)
    return build_generator(GeneratorConfig(arch="dcgan", width=4, max_width=8, z_dim=8), 28, 1)


def test_half_life_halves_after_half_life_images() -> None:
    ema = EMA(nn.Linear(1, 1, bias=False), EMAConfig(half_life_kimg=10.0, rampup=0.0))
    batch = 100
    beta = ema.beta(step=5, batch_size=batch, images_seen=10**6)
    assert beta == pytest.approx(0.5 ** (batch / 10_000))
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        ema.model.weight.fill_(1.0)
    for step in range(10_000 // batch):  # 10 kimg = one half-life
        ema.update(model, step, batch, images_seen=(step + 1) * batch)
    assert ema.model.weight.item() == pytest.approx(0.5, rel=1e-5)


def test_rampup_caps_the_half_life() -> None:
    ema = EMA(nn.Linear(1, 1), EMAConfig(half_life_kimg=10.0, rampup=0.05))
    assert ema.beta(1, 64, images_seen=1000) == pytest.approx(0.5 ** (64 / 50))  # min(10000, 0.05 * 1000)
    assert ema.beta(1, 64, images_seen=10**7) == pytest.approx(0.5 ** (64 / 10_000))  # cap inactive
    assert ema.beta(0, 64, images_seen=0) == 0.0  # nothing seen: copy


def test_fixed_decay_and_start_step() -> None:
    ema = EMA(nn.Linear(1, 1), EMAConfig(decay=0.999, start_step=10))
    assert ema.beta(10, 64, 640) == 0.999
    assert ema.beta(500, 1, 10**9) == 0.999
    assert ema.beta(9, 64, 576) == 0.0


def test_update_copies_before_start_step() -> None:
    g = _small_g()
    ema = EMA(g, EMAConfig(start_step=3))
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    assert ema.update(g, step=2, batch_size=8, images_seen=24) == 0.0
    for (name, p), p_ema in zip(g.named_parameters(), ema.model.parameters()):
        assert torch.equal(p, p_ema), name


def test_parameters_averaged_and_buffers_copied() -> None:
    g = _small_g()
    ema = EMA(g, EMAConfig(decay=0.75))
    old = {k: v.clone() for k, v in ema.model.named_parameters()}
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p))
    g.train()
    g(torch.randn(6, 8))  # moves BN running stats and num_batches_tracked
    assert ema.update(g, step=1, batch_size=6, images_seen=6) == 0.75
    for name, p in g.named_parameters():
        expected = 0.25 * p + 0.75 * old[name]
        assert torch.allclose(dict(ema.model.named_parameters())[name], expected, atol=1e-7), name
    buffers = dict(ema.model.named_buffers())
    assert any("running_mean" in n for n in buffers)
    for name, b in g.named_buffers():
        assert torch.equal(buffers[name], b), name
    assert int(buffers["net.2.num_batches_tracked"]) == 1


def test_ema_model_is_frozen_copy_in_eval_mode() -> None:
    g = _small_g()
    ema = EMA(g, EMAConfig())
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in g.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(g.parameters(), ema.model.parameters()))


def test_state_dict_round_trip() -> None:
    g = _small_g()
    ema = EMA(g, EMAConfig(decay=0.5))
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(3.0)
    ema.update(g, 0, 8, 8)
    fresh = EMA(build_generator(GeneratorConfig(arch="dcgan", width=4, max_width=8, z_dim=8), 28, 1), EMAConfig())
    fresh.model.load_state_dict(ema.model.state_dict())
    z = torch.randn(3, 8)
    assert torch.equal(fresh.model(z), ema.model(z))
    # the state dict is a plain generator state dict, loadable for sampling
    g2 = build_generator(GeneratorConfig(arch="dcgan", width=4, max_width=8, z_dim=8), 28, 1).eval()
    g2.load_state_dict(ema.model.state_dict())
    assert torch.equal(g2(z), ema.model(z))


def test_works_with_spectral_norm() -> None:
    torch.manual_seed(0)
    d = build_discriminator(DiscriminatorConfig(arch="dcgan", width=4, max_width=8, norm="spectral"), 28, 1)
    ema = EMA(d, EMAConfig(decay=0.5))
    old = {k: v.clone() for k, v in ema.model.named_parameters()}
    assert any("parametrizations.weight.original" in k for k in old)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(1.0)
    d.train()
    d(torch.randn(4, 1, 28, 28))  # power iteration moves u and v
    ema.update(d, 1, 4, 4)
    for name, p in d.named_parameters():
        assert torch.allclose(dict(ema.model.named_parameters())[name], 0.5 * p + 0.5 * old[name]), name
    buffers = dict(ema.model.named_buffers())
    assert any(n.endswith("_u") for n in buffers)
    for name, b in d.named_buffers():
        assert torch.equal(buffers[name], b), name
    assert ema.model(torch.randn(2, 1, 28, 28)).shape == (2,)


def test_wrapped_model_is_refused_with_a_hint() -> None:
    g = _small_g()
    ema = EMA(g, EMAConfig())
    with pytest.raises(ValueError, match="unwrap"):
        ema.update(nn.Sequential(g), 0, 8, 8)
