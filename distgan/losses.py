"""Adversarial losses and gradient penalties as pure functions: logits in, scalar out (fp32).

Losses (D logits are raw scores; sigmoid(l) is D's probability of "real" for the BCE-based kinds):

- minimax: D minimises BCE; G minimises the paper's saturating E[log(1 - D(G(z)))] = -softplus(l).
- non-saturating: D as minimax; G minimises -log D(G(z)) = softplus(-l).
- hinge: D minimises relu(1 - l_real) + relu(1 + l_fake); G minimises -l_fake.
- wasserstein: D minimises l_fake - l_real; G minimises -l_fake.
- least-squares (LSGAN, a=0, b=1, c=1): D minimises 0.5 (l_real - 1)^2 + 0.5 l_fake^2; G 0.5 (l_fake - 1)^2.

Penalties are unweighted means; :func:`penalty_weight` gives the factor the trainer multiplies them by.
They follow the PyTorch AMP gradient-penalty recipe: the outputs are scaled before ``autograd.grad`` (so
fp16 gradients do not underflow), the gradients are unscaled afterwards, and the penalty is computed in fp32.
The inner backward gives each sample the seed min(S / B, 2**12), S the GradScaler's scale: S / B is the size
the loss's own backward has (a mean over the batch). Seeding with the sum would give each sample S (65,536 at
the start: above fp16's 65,504), and S / B alone overflows too once the scaler has grown S (2**22 at B = 64
after 12,000 clean steps): the cap keeps 16x headroom below fp16's largest number, far above its smallest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from distgan.precision import at_least_fp32
from distgan.registry import Registry

MAX_SAMPLE_SEED = 2.0**12  # the inner backward's largest per-sample seed under fp16 loss scaling


def _d_bce(real: Tensor, fake: Tensor) -> Tensor:  # -log sigmoid(r) - log(1 - sigmoid(f))
    return F.softplus(-real).mean() + F.softplus(fake).mean()


@dataclass(frozen=True)
class Loss:
    """One ``loss.kind``: D's loss on (real, fake) logits and G's on fake logits, each a batch mean."""

    d: Callable[[Tensor, Tensor], Tensor]
    g: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Penalty:
    """One ``loss.penalty``: where D's input gradient is taken, and the factor on ``loss.penalty_weight``."""

    on: str  # "real" (R1), "fake" (R2), "interpolates" (WGAN-GP), "" (none)
    factor: float  # R1/R2 are gamma/2 |grad|^2; WGAN-GP lambda (|grad| - 1)^2


LOSSES: Registry[Loss] = Registry("loss.kind")
LOSSES.register("minimax")(Loss(_d_bce, lambda fake: -F.softplus(fake).mean()))  # log(1 - sigmoid(l)) = -softplus(l)
LOSSES.register("non-saturating")(Loss(_d_bce, lambda fake: F.softplus(-fake).mean()))  # -log sigmoid(l)
LOSSES.register("hinge")(Loss(lambda real, fake: F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean(),
                              lambda fake: -fake.mean()))
LOSSES.register("wasserstein")(Loss(lambda real, fake: fake.mean() - real.mean(), lambda fake: -fake.mean()))
LOSSES.register("least-squares")(Loss(lambda real, fake: 0.5 * (real - 1.0).square().mean() + 0.5 * fake.square().mean(),
                                      lambda fake: 0.5 * (fake - 1.0).square().mean()))

PENALTIES: Registry[Penalty] = Registry("loss.penalty")
PENALTIES.register("none")(Penalty("", 0.0))
PENALTIES.register("wgan-gp")(Penalty("interpolates", 1.0))
PENALTIES.register("r1")(Penalty("real", 0.5))
PENALTIES.register("r2")(Penalty("fake", 0.5))
LOSS_KINDS = LOSSES.names()
PENALTY_KINDS = PENALTIES.names()


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D's loss on a batch of real and a batch of fake logits (each averaged over its batch)."""
    return LOSSES[kind].d(at_least_fp32(real_logits), at_least_fp32(fake_logits))


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    """G's loss on the logits D gives its samples."""
    return LOSSES[kind].g(at_least_fp32(fake_logits))


def _input_grads(outputs: Tensor, inputs: Tensor, grad_scale: Union[float, Tensor]) -> Tensor:
    """d outputs.sum() / d inputs as (at least) fp32 [B, prod(rest)], differentiable (create_graph=True)."""
    if not inputs.requires_grad:
        raise ValueError("gradient penalty: the inputs must require grad (call inputs.requires_grad_(True) before D)")
    outputs = at_least_fp32(outputs)
    if isinstance(grad_scale, float) and grad_scale == 1.0:  # no loss scaler: the plain gradient, no rounding
        (grad,) = torch.autograd.grad(outputs=outputs.sum(), inputs=inputs, create_graph=True)
    else:  # each sample seeded with min(S / B, 2**12) (see the module docstring), then unscaled
        seed = torch.as_tensor(grad_scale, dtype=torch.float32, device=outputs.device) / outputs.numel()
        seed = seed.clamp(max=MAX_SAMPLE_SEED)  # on the device: no host sync for the scaler's tensor
        (grad,) = torch.autograd.grad(outputs=outputs.sum() * seed, inputs=inputs, create_graph=True)
        grad = grad / seed
    grad = at_least_fp32(grad)
    return rearrange(grad, "b ... -> b (...)")


def input_grad_sq_norm(outputs: Tensor, inputs: Tensor, grad_scale: Union[float, Tensor] = 1.0) -> Tensor:
    """Per-sample squared norm |d outputs.sum() / d inputs_i|^2, shape [B], fp32, differentiable."""
    return _input_grads(outputs, inputs, grad_scale).square().sum(dim=1)


def r1_penalty(logits: Tensor, inputs: Tensor, grad_scale: Union[float, Tensor] = 1.0) -> Tensor:
    """E|grad_x D(x)|^2 (Mescheder et al. 2018), unweighted. On real inputs it is R1, on fakes R2."""
    return input_grad_sq_norm(logits, inputs, grad_scale).mean()


def wgan_gp_penalty(logits_hat: Tensor, x_hat: Tensor, grad_scale: Union[float, Tensor] = 1.0) -> Tensor:
    """E(|grad_x D(x_hat)| - 1)^2 at interpolates x_hat (Gulrajani et al. 2017), unweighted."""
    norms = torch.linalg.vector_norm(_input_grads(logits_hat, x_hat, grad_scale), dim=1)  # norm's grad is 0 at 0
    return (norms - 1.0).square().mean()


def interpolate(real: Tensor, fake: Tensor, generator: Optional[torch.Generator] = None,
                alpha: Optional[Tensor] = None) -> Tensor:
    """alpha * real + (1 - alpha) * fake with one alpha ~ U[0, 1) per sample; detached, requires grad.

    ``alpha`` [B] may be given (the trainer draws it for the global batch so that any process count sees the
    same numbers); else it is drawn from ``generator``.
    """
    if real.shape != fake.shape:
        raise ValueError(f"interpolate: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    if alpha is None:
        draw_device = generator.device if generator is not None else real.device
        alpha = torch.rand(shape, generator=generator, device=draw_device)
    alpha = alpha.reshape(shape).to(device=real.device, dtype=real.dtype)
    return (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)


def penalty_weight(kind: str, weight: float, interval: int) -> float:
    """The factor for the unweighted penalty: gamma/2 for R1/R2, lambda for WGAN-GP, times the lazy interval."""
    return weight * PENALTIES[kind].factor * interval
