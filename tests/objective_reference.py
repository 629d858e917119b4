"""The GAN objective written out again from the papers, independent of distgan.losses and distgan.objective.

Tests compare what the trainer computes against these: the adversarial D losses, the penalties as autograd of
their formulas, and the factor each penalty weight is multiplied by. Nothing here imports distgan.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# D's loss on real and fake logits, each averaged over its batch (softplus(-l) = -log sigmoid(l))
D_LOSS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "minimax": lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(),
    "non-saturating": lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(),
    "hinge": lambda r, f: torch.clamp(1 - r, min=0).mean() + torch.clamp(1 + f, min=0).mean(),
    "wasserstein": lambda r, f: f.mean() - r.mean(),
    "least-squares": lambda r, f: 0.5 * ((r - 1) ** 2).mean() + 0.5 * (f ** 2).mean(),
}
# G's loss on D's logits for its samples: the saturating log(1 - D) of the paper, or one of the alternatives
G_LOSS: dict[str, Callable[[Tensor], Tensor]] = {
    "minimax": lambda f: -F.softplus(f).mean(),
    "non-saturating": lambda f: F.softplus(-f).mean(),
    "hinge": lambda f: -f.mean(),
    "wasserstein": lambda f: -f.mean(),
    "least-squares": lambda f: 0.5 * ((f - 1) ** 2).mean(),
}
# R1/R2 are gamma/2 E|grad|^2 (Mescheder et al. 2018); WGAN-GP is lambda E(|grad| - 1)^2 (Gulrajani et al. 2017)
FACTOR = {"r1": 0.5, "r2": 0.5, "wgan-gp": 1.0}


def _call(D: nn.Module, x: Tensor, y: Optional[Tensor]) -> Tensor:
    return D(x) if y is None else D(x, y)


def input_gradients(D: nn.Module, x: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """Per-sample d D(x).sum() / d x, flattened to [B, -1], kept in the graph (for the parameter gradient)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_call(D, x, y).sum(), x, create_graph=True)
    return grad.flatten(1)


def penalty(kind: str, D: nn.Module, real: Tensor, fake: Tensor, x_hat: Optional[Tensor] = None,
            real_labels: Optional[Tensor] = None, fake_labels: Optional[Tensor] = None) -> Tensor:
    """The unweighted penalty of ``kind``: R1 on the reals, R2 on the fakes, WGAN-GP at the interpolates."""
    if kind == "r1":
        return input_gradients(D, real, real_labels).pow(2).sum(1).mean()
    if kind == "r2":
        return input_gradients(D, fake, fake_labels).pow(2).sum(1).mean()
    norms = input_gradients(D, x_hat, real_labels).pow(2).sum(1).sqrt()
    return ((norms - 1) ** 2).mean()


def adversarial(kind: str, D: nn.Module, real: Tensor, fake: Tensor, real_labels: Optional[Tensor] = None,
                fake_labels: Optional[Tensor] = None, joint: bool = False) -> Tensor:
    """D's adversarial loss, calling D on the reals first and the fakes second (as a D phase does with batch norm in
    D), or (``joint``) once on both, reals first (as it does without: one forward, one spectral-norm iteration)."""
    if joint:
        labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
        real_logits, fake_logits = _call(D, torch.cat([real, fake]), labels).split(len(real))
        return D_LOSS[kind](real_logits, fake_logits)
    return D_LOSS[kind](_call(D, real, real_labels), _call(D, fake, fake_labels))


def parameter_gradients(scalar: Tensor, module: nn.Module) -> dict[str, Tensor]:
    """d scalar / d each parameter of ``module`` (zeros where it does not depend on one)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(scalar, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(named, grads)}


def flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors.values()])
