"""train.compile: compiled G and D (torch.compile, inductor, as the trainer's ``Module.compile()``) train the same
math as eager, spectral norm's in-place power iteration and the joint real+fake D forward included.

Float64 so that the tolerance follows from the arithmetic: inductor fuses and reorders sums (at most ~512 terms per
dot product here, each rounding ~1.1e-16 relative), so losses and parameters after 3 Adam steps (lr 2e-4) agree to
far better than 1e-9 relative; a wrong graph (a missed power iteration, a stale sigma, a wrong half of the joint
batch) moves them by 1e-6 or more.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from distgan.config import DiscriminatorConfig, GeneratorConfig, LossConfig
from distgan.nn import build_discriminator, build_generator
from distgan.objective import GANObjective


def train(D, G, steps: int) -> list[tuple[float, float]]:
    objective = GANObjective(LossConfig(kind="hinge"))
    opt_d, opt_g = torch.optim.Adam(D.parameters(), 2e-4), torch.optim.Adam(G.parameters(), 2e-4)
    figures = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        real = torch.rand(8, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1
        z = torch.randn(8, 8, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            fake = G(z)
        loss_d, _ = objective.discriminator(D, real, fake, regularize=False, alpha=None, autocast=nullcontext,
                                            grad_scale=1.0)
        loss_d.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        D.requires_grad_(False)
        loss_g, _ = objective.generator(D, G, z, nullcontext)
        loss_g.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        D.requires_grad_(True)
        figures.append((loss_d.item(), loss_g.item()))
    return figures


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_training_is_eager_training():
    torch.manual_seed(0)
    D = build_discriminator(DiscriminatorConfig(arch="dcgan", width=8, max_width=32, norm="spectral"), 28, 1).double()
    G = build_generator(GeneratorConfig(arch="dcgan", width=8, max_width=32, z_dim=8), 28, 1).double()
    D_c, G_c = copy.deepcopy(D), copy.deepcopy(G)
    D_c.compile()
    G_c.compile()
    torch._dynamo.reset()
    eager, compiled = train(D, G, 3), train(D_c, G_c, 3)
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=0)
    for net, net_c in ((D, D_c), (G, G_c)):  # parameters, BN statistics and spectral norm's u, v
        for (name, x), y in zip(net.state_dict().items(), net_c.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-12, msg=name)
