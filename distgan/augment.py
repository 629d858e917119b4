"""Differentiable augmentation of everything D sees (DiffAugment), with an optional ADA-style adaptive probability.

DiffAugment: Zhao, Liu, Lin, Zhu and Han, "Differentiable Augmentation for Data-Efficient GAN Training"
(NeurIPS 2020); the ops and their parameters follow the reference implementation (mit-han-lab/data-efficient-gans,
``DiffAugment_pytorch.py``): brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5), translation
by up to 1/8 of the size (zero padding), one cutout square of half the size. Images are in [-1, 1] as there.
ADA: Karras, Aittala, Hellsten, Laine, Lehtinen and Aila, "Training Generative Adversarial Networks with Limited
Data" (NeurIPS 2020): every ``interval`` D phases, r_t = E[sign(D(real))] over them, and p moves by
sign(r_t - target) * images / (speed_kimg * 1000), so p can go from 0 to 1 in ``speed_kimg`` thousand images.

:class:`Augmented` wraps D before ``accelerator.prepare``, so every D forward of both phases (real, fake,
WGAN-GP interpolates) sees augmented images and G gets its gradients through the ops. Each op is applied to
each image with probability p (p = 1 is DiffAugment as published). Randomness: the ops draw from torch's
global RNG, which the trainer reseeds every step from (seed, step, rank): runs repeat and resume bit-identically,
and each rank draws its own augmentations (so N processes do not reproduce one process's numbers).

Gradient penalties (R1, R2, WGAN-GP) are taken, as in stylegan2-ada, w.r.t. the input given to the wrapper,
i.e. the NON-augmented image: the gradient flows back through the augmentation (translated, zeroed under the
cutout, scaled by the colour factors).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distgan.config import AugmentConfig

TRANSLATION_RATIO, CUTOUT_RATIO = 0.125, 0.5  # the reference implementation's defaults


def _per_image(x: Tensor) -> Tensor:
    return torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device)


def brightness(x: Tensor) -> Tensor:
    return x + (_per_image(x) - 0.5)


def saturation(x: Tensor) -> Tensor:
    """Scales each pixel's distance to its channel mean; one channel has no colour to saturate (the identity)."""
    if x.size(1) == 1:
        return x
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_image(x) * 2) + mean


def contrast(x: Tensor) -> Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_per_image(x) + 0.5) + mean


def translation(x: Tensor, ratio: float = TRANSLATION_RATIO) -> Tensor:
    """Shift each image by up to ratio * size pixels in each direction, filling with zeros (a gather: differentiable)."""
    b, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-shift_h, shift_h + 1, size=[b, 1, 1], device=x.device)
    tx = torch.randint(-shift_w, shift_w + 1, size=[b, 1, 1], device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, h + 1)
    gx = torch.clamp(gx + tx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[gb, gy, gx].permute(0, 3, 1, 2)


def cutout(x: Tensor, ratio: float = CUTOUT_RATIO) -> Tensor:
    """Zero one square of ratio * size per image, centred anywhere (it may be clipped at the border)."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - size_h % 2), size=[b, 1, 1], device=x.device)
    ox = torch.randint(0, w + (1 - size_w % 2), size=[b, 1, 1], device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(size_h, device=x.device),
                                torch.arange(size_w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + oy - size_h // 2, min=0, max=h - 1)
    gx = torch.clamp(gx + ox - size_w // 2, min=0, max=w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gy, gx] = 0
    return x * mask.unsqueeze(1)


OPS: dict[str, list[Callable[[Tensor], Tensor]]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}


def augment(x: Tensor, policy: list[str], p: Tensor | float) -> Tensor:
    """Apply each op of ``policy`` (in order) to each image with probability ``p`` (a device tensor: no sync)."""
    for name in policy:
        for op in OPS[name]:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device) >= p
            x = torch.where(keep, x, op(x))
    return x


class Augmented(nn.Module):
    """D behind differentiable augmentation. ``p`` (and the ADA accumulators) are buffers: they are saved and
    restored with D's state_dict, so a resumed run continues with the same p.

    r_t needs D's logits on REAL images: :class:`RealBatchMarker` flags each real batch as it is drawn, and the
    next D forward with trainable parameters (the D phase's first call, D(real)) is counted. The sums stay on the
    device; every ``interval`` counted calls they are summed over ranks (one small all-reduce, no host sync) and
    r_t and, when adaptive, p are updated on the device.
    """

    def __init__(self, inner: nn.Module, cfg: AugmentConfig) -> None:
        super().__init__()
        self.inner, self.policy = inner, list(cfg.policy)
        self.adaptive, self.target, self.interval, self.speed_kimg = cfg.adaptive, cfg.target, cfg.interval, cfg.speed_kimg
        self.register_buffer("p", torch.tensor(cfg.p, dtype=torch.float32))
        self.register_buffer("rt", torch.zeros((), dtype=torch.float32))  # r_t of the last interval
        # [sum of sign(D(real)), real images] since the last update, and counted calls since the last update
        self.register_buffer("signs", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self._calls = 0  # host copy of ``calls`` (no sync to decide an update); refreshed when a state is loaded
        self._expect_real = 0  # the next trainable forward's leading real images (0: none expected)
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh_host_calls())

    def _refresh_host_calls(self) -> None:
        self._calls = int(self.calls)  # once at load time, never inside a step

    def expect_real(self, count: int) -> None:
        """The next trainable D forward starts with ``count`` real images (see :class:`RealBatchMarker`); the rest of
        its batch, if any, is fake (distgan.objective judges real and fake in one forward where it can)."""
        self._expect_real = count

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        logits = self.inner(augment(x, self.policy, self.p), *args, **kwargs)
        trainable = any(p.requires_grad for p in self.inner.parameters())
        if self._expect_real and trainable and self.training:
            real_logits, self._expect_real = logits[:self._expect_real].detach(), 0
            self._observe(real_logits)
        return logits

    @torch.no_grad()
    def _observe(self, real_logits: Tensor) -> None:
        signs = torch.sign(real_logits.float()).sum().to(torch.int64)
        self.signs += torch.stack([signs, torch.full_like(signs, real_logits.numel())])
        self.calls += 1
        self._calls += 1
        if self._calls % self.interval == 0:
            self._update()

    @torch.no_grad()
    def _update(self) -> None:
        totals = self.signs.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        rt = totals[0].double() / totals[1].double()
        self.rt.copy_(rt)
        if self.adaptive:
            step = torch.sign(rt - self.target) * totals[1].double() / (self.speed_kimg * 1000)
            self.p.copy_((self.p.double() + step).clamp(0.0, 1.0))
        self.signs.zero_()

    def figures(self) -> dict[str, float]:
        """``augment_p`` and ``augment_rt`` (NaN before the first interval): read at a log step (a sync point)."""
        p, rt = torch.stack([self.p.float(), self.rt.float()]).tolist()
        return {"augment_p": p, "augment_rt": rt if self._calls >= self.interval else math.nan}


class RealBatchMarker:
    """A data source whose every batch, as it is drawn, tells the wrapper that D's next forward is on real images."""

    def __init__(self, source: Any, augmented: Augmented) -> None:
        self.source, self.augmented = source, augmented

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def batches(self, *args: Any, **kwargs: Any) -> Iterator:
        inner = self.source.batches(*args, **kwargs)
        try:
            for batch in inner:
                self.augmented.expect_real(len(batch[0]))
                yield batch
        finally:
            if hasattr(inner, "close"):
                inner.close()
