"""Spectral norm with one power iteration per D update, and D judging real and fake in one forward: the math.

Float64 throughout, so "the same numbers" means equal to rounding of the order of 1e-15, not a loose tolerance.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from distgan.config import DiscriminatorConfig, LossConfig
from distgan.nn import build_discriminator
from distgan.nn.layers import SpectralNorm, apply_spectral_norm
from distgan.objective import GANObjective

RTOL = 1e-12  # float64: a few hundred roundings of 1e-16 each


def layers_of(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "parametrizations")]


def sn_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A small conv net with distgan's spectral norm and the same net with torch's, with equal weights and u, v."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 1)).double()
    reference = copy.deepcopy(net)
    for layer in (reference[0], reference[3]):
        torch_spectral_norm(layer)
    apply_spectral_norm(net)
    net.load_state_dict(reference.state_dict())  # the same keys: a checkpoint of either loads into the other
    return net, reference


def test_the_state_dict_is_torchs():
    net, reference = sn_pair()
    assert net.state_dict().keys() == reference.state_dict().keys()
    assert "0.parametrizations.weight.0._u" in net.state_dict()
    assert isinstance(net[0].parametrizations.weight[0], SpectralNorm)


def test_a_training_forward_is_torchs_forward():
    """The first forward that trains W: the same power iteration, u, v, normalised weight, output and gradients."""
    net, reference = sn_pair()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    out, ref_out = net(x), reference(x)
    torch.testing.assert_close(out, ref_out, rtol=RTOL, atol=0)
    for ours, theirs in zip(layers_of(net), layers_of(reference)):
        torch.testing.assert_close(ours.parametrizations.weight[0]._u, theirs.parametrizations.weight[0]._u,
                                   rtol=RTOL, atol=0)
    out.sum().backward()
    ref_out.sum().backward()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=0)


def test_forwards_that_do_not_train_the_weight_keep_u_and_v():
    """D frozen (the G phase), no-grad and eval forwards: sigma = u^T W v from the current u, v, which stay."""
    net, _ = sn_pair()
    net(torch.randn(3, 2, 6, 6, dtype=torch.float64)).sum().backward()  # the D phase: one iteration
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))  # D's update
    layer = net[0]
    sn = layer.parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    W = layer.parametrizations.weight.original
    expected = W / torch.vdot(u, W.flatten(1) @ v)
    for context in (lambda: frozen(net), torch.no_grad, lambda: evaluating(net)):
        with context():
            torch.testing.assert_close(layer.weight, expected, rtol=RTOL, atol=0)
            net(torch.randn(3, 2, 6, 6, dtype=torch.float64))
        assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    net(torch.randn(3, 2, 6, 6, dtype=torch.float64))  # the next D phase iterates again
    assert not torch.equal(sn._u, u)


class frozen:  # noqa: N801 - a context manager like torch.no_grad
    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __enter__(self) -> None:
        self.net.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        self.net.requires_grad_(True)


class evaluating(frozen):  # noqa: N801
    def __enter__(self) -> None:
        self.net.eval()

    def __exit__(self, *exc) -> None:
        self.net.train()


def discriminator(norm: str, conditional: bool = False) -> nn.Module:
    torch.manual_seed(0)
    cfg = DiscriminatorConfig(arch="dcgan", width=4, max_width=8, norm=norm, conditional=conditional, dropout=0.0)
    return build_discriminator(cfg, 28, 1, num_classes=3 if conditional else None).double()


def d_phase(D: nn.Module, objective: GANObjective, joint: bool, regularize: bool = False, seed: int = 1):
    """The D phase's loss, figures and gradients, with D judging real and fake in one forward or in two."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.rand(6, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1
    fake = torch.rand(6, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1
    labels = [torch.randint(0, 3, (6,), generator=gen) for _ in range(2)]
    alpha = torch.rand(6, generator=gen, dtype=torch.float64)
    conditional = hasattr(D, "embed") or any("embed" in name for name, _ in D.named_modules())
    objective._joint[id(D)] = joint
    loss, figures = objective.discriminator(D, real, fake, regularize=regularize, alpha=alpha, autocast=nullcontext,
                                            grad_scale=1.0, real_labels=labels[0] if conditional else None,
                                            fake_labels=labels[1] if conditional else None)
    loss.backward()
    grads = [p.grad.clone() for p in D.parameters()]
    D.zero_grad(set_to_none=True)
    return loss.detach(), figures, grads


@pytest.mark.parametrize("norm, conditional, penalty", [
    ("spectral", False, "none"), ("spectral", True, "none"), ("layer", False, "none"), ("spectral", False, "wgan-gp"),
    ("none", True, "wgan-gp")])
def test_one_forward_on_real_and_fake_gives_the_two_forwards_loss_and_gradients(norm, conditional, penalty):
    """Where D has no batch statistics (spectral, layer, none; a projection head with each half's labels) the joint
    forward is the same function of the same numbers; spectral norm's weight is the same in both (one per phase)."""
    D = discriminator(norm, conditional)
    twin = copy.deepcopy(D)
    objective = GANObjective(LossConfig(kind="hinge", penalty=penalty))
    loss, figures, grads = d_phase(D, objective, joint=True, regularize=penalty != "none")
    ref_loss, ref_figures, ref_grads = d_phase(twin, objective, joint=False, regularize=penalty != "none")
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
    for key in ref_figures:
        torch.testing.assert_close(figures[key], ref_figures[key], rtol=RTOL, atol=1e-15)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=RTOL, atol=1e-15)
    for ours, theirs in zip(D.buffers(), twin.buffers()):
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=0)


def test_a_batch_norm_discriminator_keeps_two_forwards():
    D = discriminator("batch")
    objective = GANObjective(LossConfig(kind="hinge"))
    seen = []
    D.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    objective.discriminator(D, torch.zeros(6, 1, 28, 28, dtype=torch.float64),
                            torch.ones(6, 1, 28, 28, dtype=torch.float64), regularize=False, alpha=None,
                            autocast=nullcontext, grad_scale=1.0)
    assert seen == [6, 6]  # a joint batch would normalise real and fake with each other's statistics


def test_every_d_forward_of_a_phase_uses_the_sigma_of_its_start():
    """WGAN-GP judges the interpolates in a second forward: the same normalised weight, one power iteration."""
    D = discriminator("spectral")
    first = layers_of(D)[0]
    sn = first.parametrizations.weight[0]
    weights, u_before = [], sn._u.clone()
    first.register_forward_pre_hook(lambda module, args: weights.append(module.weight))
    reference = copy.deepcopy(sn)
    reference._power_method(first.parametrizations.weight.original.flatten(1), 1)
    d_phase(D, GANObjective(LossConfig(kind="wasserstein", penalty="wgan-gp")), joint=True, regularize=True)
    assert len(weights) == 2 and weights[0] is weights[1]
    assert not torch.equal(sn._u, u_before)
    torch.testing.assert_close(sn._u, reference._u, rtol=RTOL, atol=0)  # exactly one iteration in the phase


def test_sigma_is_computed_in_fp32_under_autocast(monkeypatch):
    """bf16 autocast (CPU here; fp16/bf16 on a GPU): u, v stay fp32 and the normalised weight is the fp32 one.

    CPU autocast leaves ``mv`` in fp32 anyway, CUDA's casts it to fp16/bf16: so the test also checks that every
    ``mv`` of the power iteration and of sigma runs with autocast off, the mechanism that protects the GPU run."""
    real_mv, autocast_on = torch.mv, []

    def mv(*args, **kwargs):
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return real_mv(*args, **kwargs)

    monkeypatch.setattr(torch, "mv", mv)
    torch.manual_seed(0)
    layer = apply_spectral_norm(nn.Conv2d(3, 8, 3))
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        weight = layer.weight
    expected = twin.weight  # the same iteration in fp32 without autocast
    sn = layer.parametrizations.weight[0]
    assert sn._u.dtype == sn._v.dtype == weight.dtype == torch.float32
    torch.testing.assert_close(weight, twin.weight, rtol=0, atol=0)
    torch.testing.assert_close(sn._u, twin.parametrizations.weight[0]._u, rtol=0, atol=0)
    assert out.dtype == torch.bfloat16 and expected.dtype == torch.float32
    assert len(autocast_on) >= 3 and not any(autocast_on)  # 2 in the iteration, 1 for sigma (per weight access)


def test_two_training_forwards_then_one_backward_work_as_with_torchs():
    """A hand-written loop's ``D(real)``, ``D(fake)``, one backward: each training forward iterates once, as torch's."""
    net, reference = sn_pair()
    x, y = torch.randn(2, 3, 2, 6, 6, dtype=torch.float64)
    loss, ref_loss = net(x).mean() - net(y).mean(), reference(x).mean() - reference(y).mean()
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=0)
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=0)
