"""The one numeric-precision helper shared by the losses, the synchronized batch norm and the trainer."""
from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast outputs) promoted to fp32; fp32 and fp64 (gradient checks) stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
