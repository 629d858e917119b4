"""Processes and precision: the Accelerator for a run, the launches it refuses, the global batch and each rank's
share of it (and the learning-rate factor that follows), CPU threads, rank agreement.

Only this module, the trainer and the checkpoint code touch Accelerate; the GAN step's own distribution
decisions (global-batch randomness, D frozen in the G phase) are described in distgan.trainer.
"""
from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from distgan.config import ConfigError, LogConfig, RunConfig, TrainConfig
from distgan.errors import UserError

# torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, which Accelerate cannot pass yet;
# broadcast_buffers=False is what we need (DESIGN: in-place buffer broadcast breaks two D forwards on CUDA).
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class PrecisionSource:
    """Where the launcher's mixed precision was set, and how to change it there (for error messages)."""

    where: str
    fix: str


def launcher_precision_source(value: str, launcher_argv: Optional[list[str]] = None) -> PrecisionSource:
    """Where ACCELERATE_MIXED_PRECISION=VALUE came from: ``accelerate launch``'s --mixed_precision flag, the
    accelerate config file it read (--config_file, else the user's default one), or the environment.

    ``launcher_argv`` is the parent process's command line (read from /proc when None), parsed with
    Accelerate's own launch parser, so flags are read exactly as the launcher read them."""
    args = _accelerate_launch_args(_parent_argv() if launcher_argv is None else launcher_argv)
    if args is not None and args.mixed_precision:
        return PrecisionSource(f"the --mixed_precision {value} flag of accelerate launch",
                               f"launch without --mixed_precision {value} (or with --mixed_precision no)")
    from accelerate.commands.config.config_args import default_config_file

    config_file = (args.config_file or (None if args.cpu else default_config_file)) if args is not None else None
    if config_file and os.path.isfile(config_file):
        return PrecisionSource(f"'mixed_precision: {value}' in the accelerate config file {config_file}",
                               "set mixed_precision: 'no' there, or launch with --mixed_precision no")
    return PrecisionSource(f"the environment variable ACCELERATE_MIXED_PRECISION={value}",
                           "unset it (or set it to no)")


def _parent_argv() -> list[str]:
    """The launching process's command line (Linux); empty where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _accelerate_launch_args(argv: list[str]) -> Optional[argparse.Namespace]:
    """``argv`` parsed as ``accelerate launch`` parses it (console script or ``-m accelerate.commands.launch``),
    or None when it is not that command."""
    starts = [i + 1 for i, part in enumerate(argv) if part == "accelerate.commands.launch"
              or (part == "launch" and i > 0 and Path(argv[i - 1]).name == "accelerate")]
    if not starts:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        return launch_command_parser().parse_known_args(argv[starts[0]:])[0]
    except SystemExit:  # not a command line accelerate would accept
        return None


def resolve_precision(requested: str, launcher: str, source: Optional[PrecisionSource] = None) -> str:
    """The precision to train in: the config's, or with ``auto`` the launcher's; never a silent change.

    Errors name where each setting came from: the config key, and ``source`` for the launcher's (by default
    ``launcher_precision_source``: the launch flag, the accelerate config file or the environment)."""
    if launcher != "no" and source is None and (requested not in ("auto", launcher) or not torch.cuda.is_available()):
        source = launcher_precision_source(launcher)
    if launcher != "no" and requested not in ("auto", launcher):
        raise ConfigError(
            f"the launcher asks for mixed precision '{launcher}' ({source.where}) but train.mixed_precision="
            f"'{requested}': make them agree (train.mixed_precision={launcher} or auto, or {source.fix})"
        )
    precision = launcher if requested == "auto" else requested
    if precision == "no" or torch.cuda.is_available():
        return precision
    origins, fixes = [], []
    if requested != "auto":
        origins.append(f"train.mixed_precision={requested} (the config key)")
        fixes.append("set train.mixed_precision=auto" + ("" if launcher != "no" else " (or no)"))
    if launcher != "no":
        origins.append(source.where)
        fixes.append(source.fix)
    raise ConfigError(
        f"mixed precision '{precision}' from {' and '.join(origins)} needs a GPU (none here): fp16 is ignored on CPU "
        f"and bf16 autocast is many times slower than fp32 on CPUs without bf16 units. Fix: {'; '.join(fixes)}"
    )


# train.lr_batch_scaling -> the exponent of (global batch / train.batch_size) in both optimizers' lr factor
LR_EXPONENTS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


@dataclass(frozen=True)
class BatchPlan:
    """The global batch of one D phase, each rank's share, and the factor on both optimizers' lr."""

    global_batch: int
    local_batch: int
    lr_factor: float


def batch_plan(train: TrainConfig, processes: int) -> BatchPlan:
    """The one place the global batch is decided: ``train.batch_size``, or ``train.batch_per_process`` x the
    process count (then ``train.batch_size`` is the reference batch of ``train.lr_batch_scaling``)."""
    if train.batch_per_process:
        global_batch = train.batch_per_process * processes
    elif train.batch_size % processes:
        raise ConfigError(
            f"train.batch_size={train.batch_size} does not divide over {processes} processes: choose a multiple of "
            "the process count (or set train.batch_per_process)"
        )
    else:
        global_batch = train.batch_size
    factor = (global_batch / train.batch_size) ** LR_EXPONENTS[train.lr_batch_scaling]
    return BatchPlan(global_batch, global_batch // processes, factor)


def make_accelerator(train: TrainConfig, log: LogConfig, run: RunConfig) -> Accelerator:
    """An Accelerator for these config sections, refusing launches that would silently do something else."""
    precision = resolve_precision(train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,  # `accelerate launch --multi_gpu` on a machine without CUDA: gloo DDP, no variable needed
        mixed_precision=precision,
        log_with=[name for name, on in (("wandb", log.wandb), ("tensorboard", log.tensorboard)) if on] or None,
        project_config=ProjectConfiguration(project_dir=run.dir, logging_dir=os.path.join(run.dir, "tensorboard")),
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout_s)),
        ],
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"WORLD_SIZE={world} but Accelerate set up a single non-distributed process, so each process would "
            "train an independent replica. Launch with `accelerate launch --multi_gpu --num_processes N -m "
            "distgan.train ...` (a MULTI_CPU config does not give DDP); see the launch/ config files."
        )
    batch_plan(train, accelerator.num_processes)  # refuses a batch that does not divide, before any work
    if cuda:  # cuDNN picks the fastest kernels for the fixed shapes; TF32 matmuls and convolutions on Ampere+
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return accelerator


def available_cores(environ: Mapping[str, str] = os.environ) -> int:
    """Cores this process may use: its affinity mask (taskset, pinning Slurm task plugins), and no more than Slurm
    allocated to the task (SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE), which task/none does not pin."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    allocated = environ.get("SLURM_CPUS_PER_TASK") or environ.get("SLURM_CPUS_ON_NODE") or ""
    return min(cores, int(allocated)) if allocated.isdigit() and int(allocated) > 0 else cores


def threads_per_process(cores: int, local_processes: int, requested: int = 0) -> int:
    """Intra-op threads for one process: ``requested`` when > 0, else the cores shared evenly (at least 1).

    N processes x all cores oversubscribes the CPU (measured: 2 x 2 threads on 2 cores is about 40% slower).
    """
    if requested > 0:
        return requested
    return max(1, cores // max(1, local_processes))


def set_cpu_threads(accelerator: Accelerator, requested: int = 0) -> int:
    """Set torch's threads from ``train.cpu_threads`` and return the count in use.

    OMP_NUM_THREADS is deliberately ignored: ``accelerate launch`` always sets it (to 1 unless told otherwise)
    and torchrun sets 1 for several processes, so honouring it would leave every launched CPU run on one
    thread. On a GPU only an explicit request changes torch's default.
    """
    if accelerator.device.type == "cpu" or requested > 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(threads_per_process(available_cores(), local, requested))
    return torch.get_num_threads()


@contextmanager
def main_process_work(accelerator: Accelerator, timeout_s: float) -> Iterator[Optional[dist.ProcessGroup]]:
    """A block in which the main process works alone (first-use data, the feature classifier, export, plots) while
    the others wait up to TIMEOUT_S: on a gloo group made before the work starts, never on the training backend.

    Why gloo, made first: NCCL's watchdog ends a wait on the default group at train.collective_timeout_s, and
    ``new_group`` makes its NCCL communicator lazily (ranks other than 0 fetch its id under the store's timeout, not
    the group's), so a group made after rank 0's work would not wait longer. Yields the group (None on one process);
    every rank leaves through one barrier on it."""
    if accelerator.num_processes == 1:
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield group
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def broadcast_from_main(accelerator: Accelerator, produce: Callable[[], Any], timeout_s: float) -> Any:
    """PRODUCE() run on the main process, its result on every rank, the others waiting up to TIMEOUT_S
    (:func:`main_process_work`), e.g. while rank 0 downloads data or trains the feature classifier."""
    result = [None]
    with main_process_work(accelerator, timeout_s) as group:
        if accelerator.is_main_process:
            result[0] = produce()
        if group is not None:
            dist.broadcast_object_list(result, src=0, group=group)
    return result[0]


def statistics_buffers(*modules: nn.Module) -> list[torch.Tensor]:
    """The floating-point buffers of batch-norm layers (running mean and variance): statistics of each rank's samples.
    Not spectral norm's u and v (every rank iterates them identically; an average of unit vectors is not one) nor
    augmentation's p and r_t (already reduced over ranks)."""
    return [b for m in modules for layer in m.modules() if isinstance(layer, _BatchNorm)
            for b in layer.buffers(recurse=False) if b.is_floating_point()]


@torch.no_grad()
def average_buffers(accelerator: Accelerator, *modules: nn.Module) -> None:
    """Replace the batch-norm statistics of ``modules`` (:func:`statistics_buffers`) by their mean over ranks, with one
    all-reduce. Plain BN under DDP (broadcast_buffers=False) updates them from each rank's own samples, so
    without this G_ema, evaluation and checkpoints would hold rank-specific statistics."""
    buffers = statistics_buffers(*modules)
    if accelerator.num_processes == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    flat = accelerator.reduce(flat, reduction="sum") / accelerator.num_processes
    torch._foreach_copy_(buffers, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in buffers]), buffers)])


def on_main_process(accelerator: Accelerator, decide: Callable[[], Any], timeout_s: Optional[float] = None) -> Any:
    """Run ``decide`` on the main process only and give every rank its answer (or its user error): one answer for
    all ranks, even when they see a shared filesystem at different moments. ``timeout_s``: how long the other
    ranks wait, on a gloo group made before the work starts, when longer than train.collective_timeout_s (a download,
    a first-use classifier)."""

    def decision() -> list:  # [result, error message]
        try:
            return [decide(), None]
        except UserError as err:
            return [None, str(err)]

    if timeout_s is not None:  # the others wait on gloo, up to timeout_s (main_process_work)
        result, error = broadcast_from_main(accelerator, decision, timeout_s)
    else:
        result, error = decision() if accelerator.is_main_process else [None, None]
        if accelerator.num_processes > 1:
            result, error = broadcast_object_list([result, error], from_process=0)
    if error is not None:
        raise ConfigError(error)
    return result
