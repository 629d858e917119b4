"""What each phase of a training step computes: the adversarial loss of ``cfg.loss`` and its penalty wiring.

The trainer decides when a phase runs and steps its optimizer (see ``Trainer.fit``); this object decides
what the phase's loss is, from the pure functions in distgan.losses. Losses and penalties are computed in
at least fp32 whatever the autocast precision; a penalty is added to the D loss so that there is one
backward (and one DDP all-reduce) per phase, never a penalty-only pass.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from distgan import losses
from distgan.config import LossConfig
from distgan.precision import at_least_fp32

Autocast = Callable[[], AbstractContextManager]
Figures = dict[str, Tensor]


def has_batch_statistics(net: nn.Module) -> bool:
    """Whether ``net``'s output for one sample depends on the others in its batch (batch norm, synchronized or not)."""
    return any(isinstance(m, _BatchNorm) for m in net.modules())


def call(net: nn.Module, x: Tensor, y: Optional[Tensor]) -> Tensor:
    """``net(x)``, or ``net(x, y)`` for a class-conditional network (y: class indices)."""
    return net(x) if y is None else net(x, y)


class GANObjective:
    """The D and G losses for ``cfg.kind``, with ``cfg.penalty`` on D when a step is a regularization step."""

    def __init__(self, cfg: LossConfig) -> None:
        self.kind, self.penalty = cfg.kind, cfg.penalty
        self.penalty_on = losses.PENALTIES[cfg.penalty].on  # "real", "fake", "interpolates", or "" (none)
        self.penalty_weight = losses.penalty_weight(cfg.penalty, cfg.penalty_weight, cfg.penalty_interval)
        self.reg_interval = cfg.penalty_interval if self.penalty_on else 0  # 0: never
        self._joint: dict[int, bool] = {}  # id(D) -> whether D may judge real and fake in one forward

    @property
    def needs_alpha(self) -> bool:
        """Whether a regularization step mixes real and fake images (WGAN-GP's interpolates)."""
        return self.penalty_on == "interpolates"

    def discriminator(self, D: nn.Module, real: Tensor, fake: Tensor, *, regularize: bool, alpha: Optional[Tensor],
                      autocast: Autocast, grad_scale: Union[float, Tensor], real_labels: Optional[Tensor] = None,
                      fake_labels: Optional[Tensor] = None) -> tuple[Tensor, Figures]:
        """D's loss on real images and (detached) generated ones, plus the weighted penalty when ``regularize``.

        A conditional D gets each batch's class labels; WGAN-GP's interpolates are judged with the real labels.

        ``grad_scale`` is the fp16 loss scale (a device tensor: reading it would sync; 1.0 otherwise): the
        penalty's inner gradient is taken on scaled outputs and unscaled after, as in PyTorch's AMP recipe.
        """
        with parametrize.cached():  # one spectral-norm weight for all D forwards of the phase (nn.layers.SpectralNorm)
            return self._discriminator(D, real, fake, regularize, alpha, autocast, grad_scale, real_labels, fake_labels)

    def _discriminator(self, D: nn.Module, real: Tensor, fake: Tensor, regularize: bool, alpha: Optional[Tensor],
                       autocast: Autocast, grad_scale: Union[float, Tensor], real_labels: Optional[Tensor],
                       fake_labels: Optional[Tensor]) -> tuple[Tensor, Figures]:
        fake = at_least_fp32(fake)
        if regularize and self.penalty_on == "real":
            real = real.detach().requires_grad_(True)
        if regularize and self.penalty_on == "fake":
            fake = fake.detach().requires_grad_(True)
        with autocast():
            real_logits, fake_logits = self._judge(D, real, fake, real_labels, fake_labels, regularize)
            loss = losses.discriminator_loss(self.kind, at_least_fp32(real_logits), at_least_fp32(fake_logits))
        figures = {"loss_d": loss.detach(), "d_real": real_logits.detach().float().mean(),
                   "d_fake": fake_logits.detach().float().mean()}
        if not regularize:
            return loss, figures
        if self.penalty_on == "real":
            value = losses.r1_penalty(real_logits, real, grad_scale=grad_scale)
        elif self.penalty_on == "fake":
            value = losses.r1_penalty(fake_logits, fake, grad_scale=grad_scale)
        else:
            x_hat = losses.interpolate(real, fake, alpha=alpha)
            with autocast():
                hat_logits = call(D, x_hat, real_labels)
            value = losses.wgan_gp_penalty(hat_logits, x_hat, grad_scale=grad_scale)
        figures["penalty"] = value.detach()
        return loss + self.penalty_weight * value, figures

    def _judge(self, D: nn.Module, real: Tensor, fake: Tensor, real_labels: Optional[Tensor],
               fake_labels: Optional[Tensor], regularize: bool) -> tuple[Tensor, Tensor]:
        """D's logits on the real and the fake batch: one forward on both together where D has no batch statistics
        (half the kernel launches; the same numbers), two where it has (a joint batch would mix real and fake
        statistics) or where an R1/R2 step differentiates w.r.t. one half (its double backward would run over both)."""
        key = id(D)
        if key not in self._joint:
            self._joint[key] = not has_batch_statistics(D)
        if not self._joint[key] or (regularize and self.penalty_on in ("real", "fake")):
            return call(D, real, real_labels), call(D, fake, fake_labels)
        labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
        logits = call(D, torch.cat([real, fake]), labels)
        return logits[:real.shape[0]], logits[real.shape[0]:]

    def generator(self, D: nn.Module, G: nn.Module, z: Tensor, autocast: Autocast,
                  labels: Optional[Tensor] = None) -> tuple[Tensor, Figures]:
        """G's loss on D's logits for G(z) (of class ``labels`` when conditional); the caller holds D frozen so
        that only G gets gradients."""
        with autocast():
            loss = losses.generator_loss(self.kind, at_least_fp32(call(D, call(G, z, labels), labels)))
        return loss, {"loss_g": loss.detach()}

