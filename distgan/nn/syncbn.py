"""Synchronized batch norm that works on CPU (gloo) and GPU (NCCL) and supports double backward.

``torch.nn.SyncBatchNorm`` refuses CPU tensors and has no double backward (pytorch#61222), so R1 and
WGAN-GP through a batch-normalized discriminator break with it. This module all-reduces the per-channel
``[sum, sum of squares, count]`` through a differentiable all-reduce and does the normalisation with
ordinary tensor ops, so autograd (first and second order) flows across ranks.

Every rank must run every training-mode forward of this module the same number of times, or the
collective hangs. In eval mode, or without a process group of more than one rank, it is plain batch
norm and communicates nothing.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distgan.precision import at_least_fp32


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce whose backward is itself (so double backward works).

    The same math as ``torch.distributed.nn.functional.all_reduce``, which torch 2.13 deprecates with a
    FutureWarning on every process; owning these lines keeps the behaviour stable across torch versions.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        # d(sum_r x_r)/dx_r = 1 on every rank: each rank's input gradient is the sum of all ranks' grads.
        return _AllReduceSum.apply(grad_output, ctx.group), None


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (default: the world), differentiably."""
    return _AllReduceSum.apply(tensor, group)


def _world_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all ranks, for inputs [B, C], [B, C, L], [B, C, H, W] ...

    In training mode with a process group of more than one rank, the mean and (biased) variance come
    from all ranks' samples, and ``running_mean``/``running_var`` get exactly the update that
    ``nn.BatchNorm`` would make on the concatenated global batch (unbiased variance over the global
    count). Statistics are computed in fp32 whatever the input dtype (autocast-safe); the output has the
    input's dtype.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected input of shape [B, C, ...], got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm: input has {input.shape[1]} channels (shape {tuple(input.shape)}), "
                f"the layer was built for {self.num_features}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or _world_size(self.process_group) <= 1:
            return super().forward(input)
        return self._forward_synchronized(input)

    def _forward_synchronized(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        reduce_dims = [0, *range(2, x.dim())]
        x32 = at_least_fp32(x)
        local_count = x.numel() // channels
        count = x32.new_full((1,), float(local_count))
        stats = torch.cat([x32.sum(reduce_dims), x32.square().sum(reduce_dims), count])
        stats = all_reduce_sum(stats, self.process_group)
        total_sum, total_sq, total_count = stats[:channels], stats[channels : 2 * channels], stats[-1]
        mean = total_sum / total_count
        var = (total_sq / total_count - mean.square()).clamp_min(0.0)  # biased variance, as BN normalizes with
        self._update_running_stats(mean, var, total_count)

        shape = (1, channels) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(x32.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(x32.dtype)
        out = x32 * scale.reshape(shape) + shift.reshape(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm does
                factor = 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1.0).clamp_min(1.0)  # tensors: no host sync on GPU
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` with a :class:`SyncBatchNorm` holding its state."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group=process_group,
        )
        reference = next(itertools.chain(module.parameters(), module.buffers()), None)
        if reference is not None:
            sync = sync.to(reference.device)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
