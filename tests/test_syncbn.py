"""distgan's SyncBatchNorm: on 2 and 3 gloo processes it equals one BatchNorm over the concatenated batch.

Each rank holds a different (unevenly sized) slice of one global batch. Forward outputs, input
gradients, summed weight/bias gradients and running statistics must match nn.BatchNorm on the whole
batch; so must the R1 penalty's parameter gradient (a double backward across ranks). Eval mode and
runs without a process group must not communicate.
"""
from __future__ import annotations

import copy
import socket
from datetime import timedelta
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import distgan.nn.syncbn as syncbn
from distgan.losses import input_grad_sq_norm, r1_penalty
from distgan.nn import SyncBatchNorm, convert_sync_batchnorm

TOL = dict(rtol=1e-5, atol=1e-5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slices(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(a, a + n) for a, n in zip(starts, sizes)]


def _reference_and_sync(channels: int, spatial: bool, momentum: Optional[float]) -> tuple[nn.Module, SyncBatchNorm]:
    torch.manual_seed(1)
    ref = nn.BatchNorm2d(channels, momentum=momentum) if spatial else nn.BatchNorm1d(channels, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1)
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    assert isinstance(sync, SyncBatchNorm) and torch.equal(sync.weight, ref.weight)
    return ref, sync


def _check_batchnorm_matches_global(rank: int, world: int, sizes: list[int]) -> None:
    piece = _slices(sizes)[rank]
    for spatial, momentum in ((True, 0.3), (False, 0.1), (True, None)):
        ref, sync = _reference_and_sync(3, spatial, momentum)
        gen = torch.Generator().manual_seed(7)
        shape = (sum(sizes), 3, 4, 5) if spatial else (sum(sizes), 3)
        for _ in range(2):  # two steps: the running statistics update twice
            x_global = (torch.randn(shape, generator=gen) * 3.0 + 2.0).requires_grad_(True)
            target = torch.randn(shape, generator=gen)
            out_ref = ref(x_global)
            (out_ref * target).sum().backward()

            x_local = x_global.detach()[piece].clone().requires_grad_(True)
            out = sync(x_local)
            (out * target[piece]).sum().backward()

            torch.testing.assert_close(out, out_ref.detach()[piece], **TOL)
            torch.testing.assert_close(x_local.grad, x_global.grad[piece], **TOL)
            for name in ("weight", "bias"):
                summed = getattr(sync, name).grad.clone()
                dist.all_reduce(summed)
                torch.testing.assert_close(summed, getattr(ref, name).grad, **TOL)
            torch.testing.assert_close(sync.running_mean, ref.running_mean, **TOL)
            torch.testing.assert_close(sync.running_var, ref.running_var, **TOL)
            assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
            ref.zero_grad()
            sync.zero_grad()


def _tiny_d() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2), nn.Linear(8, 1),
    )


def _check_r1_matches_global(rank: int, world: int) -> None:
    """Equal slices, mean penalty per rank: the rank-averaged gradient is the global batch's gradient."""
    per_rank = 4
    ref_d = _tiny_d()
    sync_d = convert_sync_batchnorm(copy.deepcopy(ref_d))
    x_global = torch.randn(world * per_rank, 2, 4, 4, generator=torch.Generator().manual_seed(5)) + 0.5
    x_global.requires_grad_(True)
    ref_logits = ref_d(x_global).squeeze(1)
    ref_sq = input_grad_sq_norm(ref_logits, x_global)
    ref_penalty = ref_sq.mean()
    ref_penalty.backward()

    x_local = x_global.detach()[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_(True)
    logits = sync_d(x_local).squeeze(1)
    torch.testing.assert_close(logits, ref_logits.detach()[rank * per_rank : (rank + 1) * per_rank], **TOL)
    sq = input_grad_sq_norm(logits, x_local)  # a collective backward: every rank calls it
    torch.testing.assert_close(sq, ref_sq.detach()[rank * per_rank : (rank + 1) * per_rank], **TOL)
    penalty = r1_penalty(logits, x_local)
    penalty.backward()  # double backward through the all-reduce
    total = penalty.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, ref_penalty.detach(), **TOL)
    assert sync_d[0].weight.grad.abs().sum() > 0 and sync_d[1].weight.grad.abs().sum() > 0
    for (name, p), p_ref in zip(sync_d.named_parameters(), ref_d.parameters()):
        averaged = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(averaged)  # what DDP does: average the ranks' gradients
        expected = torch.zeros_like(p) if p_ref.grad is None else p_ref.grad
        torch.testing.assert_close(averaged / world, expected, **TOL, msg=lambda m: f"{name}: {m}")


def _check_bf16_statistics_in_fp32(rank: int, world: int) -> None:
    ref, sync = _reference_and_sync(3, True, 0.1)
    x_global = torch.randn(world * 2, 3, 4, 4, generator=torch.Generator().manual_seed(9)) * 2 + 100.0
    out = sync(x_global[rank * 2 : (rank + 1) * 2].bfloat16())
    assert out.dtype == torch.bfloat16
    expected = ref(x_global.bfloat16().float())[rank * 2 : (rank + 1) * 2]
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def _check_eval_does_not_communicate(rank: int) -> None:
    ref, sync = _reference_and_sync(3, True, 0.1)
    ref.eval()
    sync.eval()
    original = syncbn.all_reduce_sum

    def refuse(*args, **kwargs):
        raise AssertionError("SyncBatchNorm communicated in eval mode")

    syncbn.all_reduce_sum = refuse
    try:
        for _ in range(rank + 1):  # a different number of forwards per rank would hang a collective
            x = torch.randn(rank + 2, 3, 4, 4)
            torch.testing.assert_close(sync(x), ref(x))
    finally:
        syncbn.all_reduce_sum = original


def _worker(rank: int, world: int, port: int, sizes: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        _check_batchnorm_matches_global(rank, world, sizes)
        _check_r1_matches_global(rank, world)
        _check_bf16_statistics_in_fp32(rank, world)
        _check_eval_does_not_communicate(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sizes", [[3, 5], [4, 1, 6]], ids=["2-ranks", "3-ranks"])
def test_sync_batchnorm_equals_global_batchnorm(sizes: list[int]) -> None:
    mp.spawn(_worker, args=(len(sizes), _free_port(), sizes), nprocs=len(sizes), join=True)


# ---------------------------------------------------------------- single process, no process group


@pytest.mark.parametrize("spatial", [True, False])
def test_without_process_group_it_is_plain_batchnorm(spatial: bool) -> None:
    assert not dist.is_initialized()
    ref, sync = _reference_and_sync(3, spatial, 0.1)
    x = torch.randn((6, 3, 4, 4) if spatial else (6, 3)) * 2 + 1
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    ref.eval()
    sync.eval()
    torch.testing.assert_close(sync(x), ref(x))


def test_synchronized_path_supports_double_backward_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-reduce path itself (forced with an identity all-reduce) passes gradgradcheck in float64."""
    monkeypatch.setattr(syncbn, "_world_size", lambda group: 2)
    monkeypatch.setattr(syncbn, "all_reduce_sum", lambda tensor, group=None: tensor)
    bn = SyncBatchNorm(2, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))
    assert torch.autograd.gradgradcheck(bn, (x,))
    ref = nn.BatchNorm1d(2, dtype=torch.float64)
    ref.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_wrong_channel_count_names_both() -> None:
    with pytest.raises(ValueError, match="5 channels.*built for 3"):
        SyncBatchNorm(3)(torch.randn(2, 5, 4, 4))
