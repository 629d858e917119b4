"""Numeric precision shared by the losses, the synchronized batch norm and the trainer: the fp32-promotion
helper and the end of an optimizer's phase under an optional fp16 loss scaler.

The phase end works on the plain torch optimizer and a ``torch.amp.GradScaler`` (Accelerate's, or
``GradScaler("cpu")`` in tests), so the scaler logic is tested on CPU although Accelerate refuses fp16 there.
Accelerate keeps one scaler for all optimizers; these functions unscale only the phase's optimizer and
update the scaler after every phase, skipped or not, so the next phase can unscale its own gradients.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


_FP32_OR_WIDER = (torch.float32, torch.float64)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast outputs) promoted to fp32; fp32 and fp64 (gradient checks) stay as they are."""
    return x if x.dtype in _FP32_OR_WIDER else x.float()  # not torch.promote_types: a dispatched op per call


def loss_scale(scaler: Optional[torch.amp.GradScaler]) -> Union[float, Tensor]:
    """The scaler's current scale as a device tensor (no host sync), its initial scale before the first
    backward, or 1.0 without a scaler."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = scaler._get_scale_async()  # the public get_scale() copies the scale to the host every call
    return scale if scale is not None else scaler.get_scale()


def _with_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def unscale_and_norm(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                     max_norm: float = 0.0) -> Tensor:
    """Unscale this optimizer's gradients only (fp16), return their total 2-norm; clip to ``max_norm`` when > 0.

    The norm stays on the device (non-finite after an fp16 overflow). Without clipping, no clipping kernels run.
    """
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(optimizer)
    params = _with_grads(optimizer)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step can be skipped on the device (fused kernels read ``found_inf``)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def step_unless(optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler], skip: Tensor) -> None:
    """Step ``optimizer`` unless ``skip`` (a bool tensor), then update the scaler, skipped or not.

    Call after :func:`unscale_and_norm`. A fused optimizer skips on the device (no host sync): its kernel
    leaves parameters, moments and step counts untouched when ``found_inf`` is set. Any other optimizer
    needs one host sync to decide. The scaler lowers its scale when the unscaled gradients held inf/NaN.
    """
    if is_fused(optimizer):
        optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32).reshape(())
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):
        optimizer.step()
    if scaler is not None and scaler.is_enabled():
        scaler.update()
