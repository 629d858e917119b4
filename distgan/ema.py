"""Exponential moving average of the generator's weights (G_ema), as in StyleGAN2-ADA.

The decay is a half-life counted in images, so it means the same thing at any batch size or number of
processes; a ramp-up caps the half-life at a fraction of the images seen so far, so early G_ema does not
remember the random initialisation. Parameters are averaged; buffers (BN running statistics,
num_batches_tracked, spectral-norm u/v) are copied, because an average of them is not a statistic of
any network.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from distgan.config import EMAConfig


class EMA:
    """Holds ``self.model``: a frozen, eval-mode deep copy of the model, updated towards it."""

    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def beta(self, step: int, batch_size: int, images_seen: int) -> float:
        """The decay for this update: p_ema <- beta * p_ema + (1 - beta) * p.

        ``batch_size`` is the GLOBAL batch of this step and ``images_seen`` the global count so far.
        """
        cfg = self.cfg
        if step < cfg.start_step:
            return 0.0
        if cfg.decay is not None:
            return float(cfg.decay)
        ema_nimg = cfg.half_life_kimg * 1000.0
        if cfg.rampup > 0:
            ema_nimg = min(ema_nimg, images_seen * cfg.rampup)
        return 0.5 ** (batch_size / max(ema_nimg, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, batch_size: int, images_seen: int) -> float:
        """Move G_ema towards ``model`` (the unwrapped generator); returns the beta used."""
        beta = self.beta(step, batch_size, images_seen)
        params = self._match(dict(model.named_parameters()), dict(self.model.named_parameters()), "parameters")
        # p_ema <- p_ema.lerp(p, 1 - beta) = beta * p_ema + (1 - beta) * p for all parameters in one multi-tensor
        # kernel (no per-parameter kernel; exactly p at beta 0 and p_ema at beta 1)
        sources = [p if p.dtype == p_ema.dtype else p.to(p_ema.dtype) for p, p_ema in params]
        torch._foreach_lerp_([p_ema for _, p_ema in params], sources, 1.0 - beta)
        self.copy_buffers(model)
        return beta

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """G_ema's buffers <- the model's (BN running statistics, spectral-norm vectors)."""
        pairs = self._match(dict(model.named_buffers()), dict(self.model.named_buffers()), "buffers")
        if pairs:
            torch._foreach_copy_([b_ema for _, b_ema in pairs], [b for b, _ in pairs])

    @staticmethod
    def _match(source: dict, target: dict, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if source.keys() != target.keys():
            missing = sorted(target.keys() - source.keys())[:3]
            extra = sorted(source.keys() - target.keys())[:3]
            raise ValueError(
                f"EMA.update: the model's {what} do not match G_ema's (missing {missing}, unexpected {extra}); "
                "pass the same architecture, unwrapped (accelerator.unwrap_model(G), not the DDP module)"
            )
        return [(source[name], target[name]) for name in target]
