"""Everything a training run is made of, built from the config's sections in one place (torchtitan's ``build``).

``first_use(cfg, accelerator)`` does the once-per-machine work a config may need (making ``data.path`` from
``data.prepare``, training the feature classifier for ``eval.metrics``) on the main process while the others
wait; ``build(cfg, accelerator)`` then makes the parts (data source, G, D, G_ema, optimizers, objective,
evaluator), each from its own section, and the Trainer is handed them. Nothing here trains or writes a run dir.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, replace
from typing import Optional

import torch
from accelerate import Accelerator
from torch import nn

from distgan.augment import Augmented, RealBatchMarker
from distgan.config import Config, ConfigError, DiscriminatorConfig, GeneratorConfig, OptimizerConfig
from distgan.data.stream import DataSource, ShardSource
from distgan.distributed import BatchPlan, batch_plan, make_accelerator, on_main_process, set_cpu_threads
from distgan.ema import EMA
from distgan.first_use import needs_preparing, prepare_command, prepare_if_missing
from distgan.limits import check_training
from distgan.nn import build_discriminator, build_generator, padded_resolution
from distgan.objective import GANObjective

log = logging.getLogger(__name__)

MIN_BN_SAMPLES = 32  # plain batch norm on fewer samples per rank: train.small_bn_batch decides
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


@dataclass
class Parts:
    """What the Trainer is handed: the prepared (DDP-wrapped) networks and optimizers and everything around them."""

    accelerator: Accelerator
    batch: BatchPlan  # the global batch, this rank's share, the lr factor
    source: DataSource  # real batches (marked for augmentation when augment.policy is set)
    resolution: int  # G's and D's (the data's plus 2 x data.pad)
    num_classes: Optional[int]  # class-conditional: the classes G and D are built for; else None
    G: nn.Module
    D: nn.Module  # wrapped by augmentation when augment.policy is set
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: Optional[EMA]
    augment: Optional[Augmented]
    objective: GANObjective
    evaluator: Optional[object]  # distgan.metrics.evaluator.Evaluator when eval.metrics is set
    memory_format: torch.memory_format


def make_optimizer(cfg: OptimizerConfig, params, fused: bool = False, lr_factor: float = 1.0) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` at lr ``cfg.lr * lr_factor`` (train.lr_batch_scaling); ``fused``: one kernel for all
    parameters, and a step skippable on the device."""
    lr = cfg.lr * lr_factor
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)


def norms_for_ranks(cfg: Config, batch: BatchPlan, world: int,
                    announce: bool = True) -> tuple[GeneratorConfig, DiscriminatorConfig]:
    """G's and D's sections as built on ``world`` processes. Plain batch norm normalises each rank's own samples:
    on fewer than MIN_BN_SAMPLES per rank its statistics are noise, and the run is no longer the one-process run on
    the global batch. train.small_bn_batch decides: sync-batch (normalise over all ranks' samples, as one process
    on the global batch would; one all-reduce per BN layer), error, or warn (keep plain batch norm)."""
    sections = {"generator": cfg.generator, "discriminator": cfg.discriminator}
    plain = [name for name, section in sections.items() if section.norm == "batch"]
    if not plain or world == 1 or batch.local_batch >= MIN_BN_SAMPLES:
        return cfg.generator, cfg.discriminator
    keys = " and ".join(f"{name}.norm=batch" for name in plain)
    why = (f"{keys} on a per-rank batch of {batch.local_batch} (global batch {batch.global_batch} over {world} "
           f"processes): batch statistics of fewer than {MIN_BN_SAMPLES} samples are noisy")
    fixes = (f"raise train.batch_size to at least {MIN_BN_SAMPLES * world}, set train.batch_per_process="
             f"{MIN_BN_SAMPLES} (with train.lr_batch_scaling, see the README) or norm=sync-batch")
    rule = cfg.train.small_bn_batch
    if rule == "error":
        raise ConfigError(f"{why} (train.small_bn_batch=error): {fixes}, or train.small_bn_batch=sync-batch")
    if rule == "warn":
        if announce:
            log.warning("%s; kept as plain batch norm (train.small_bn_batch=warn). To fix: %s", why, fixes)
        return cfg.generator, cfg.discriminator
    if announce:
        log.info("%s: sync-batch instead for this run, so each BN layer normalises over all ranks' samples as one "
                 "process on the global batch would (train.small_bn_batch=sync-batch; train.small_bn_batch=warn "
                 "keeps plain batch norm)", why)
    g, d = cfg.generator, cfg.discriminator
    return (replace(g, norm="sync-batch") if g.norm == "batch" else g,
            replace(d, norm="sync-batch") if d.norm == "batch" else d)


def uses_cuda_graphs(cfg: Config) -> bool:
    """train.compile_mode replays the compiled forwards and backwards as CUDA graphs (torch.compile's cudagraph
    trees; the trainer marks each step's start for them)."""
    return cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES


def check_cuda_graphs(cfg: Config, acc: Accelerator, norms: tuple[str, str]) -> None:
    """The cases CUDA graphs cannot capture, refused by name before anything is compiled."""
    if not uses_cuda_graphs(cfg):
        return
    mode = f"train.compile_mode={cfg.train.compile_mode}"
    if acc.num_processes > 1 and "sync-batch" in norms:
        raise ConfigError(
            f"{mode} with sync-batch norm on {acc.num_processes} processes: sync-batch all-reduces inside every "
            "forward, and a CUDA graph replays kernels, not collectives between ranks. Use train.compile_mode=default, "
            "or plain batch norm with at least 32 samples per rank (train.batch_per_process; train.small_bn_batch)")
    if acc.device.type != "cuda" and acc.is_main_process:
        log.info("%s on %s: CUDA graphs need a CUDA device, so this run compiles as train.compile_mode=default "
                 "would", mode, acc.device.type)


def build_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator (processes, devices, precision, trackers) with CPU threads set for this node."""
    accelerator = make_accelerator(cfg.train, cfg.log, cfg.run)
    set_cpu_threads(accelerator, cfg.train.cpu_threads)
    return accelerator


def first_use(cfg: Config, accelerator: Accelerator) -> None:
    """The once-per-machine work ``cfg`` needs before a Trainer can be built: ``data.path`` made from
    ``data.prepare``, and the feature classifier ``eval.metrics`` scores with trained; done by the main process
    while the others wait (up to data.prepare_timeout_s)."""
    timeout = cfg.data.prepare_timeout_s
    if cfg.data.prepare:
        on_main_process(accelerator, lambda: prepare_if_missing(cfg.data), timeout_s=timeout)
    if cfg.eval.metrics:
        from distgan.data.shards import read_dataset_info  # the metrics stack loads only when asked for
        from distgan.metrics.feature_net import ensure_feature_net

        on_main_process(accelerator, lambda: ensure_feature_net(
            cfg.eval, cfg.data.path, read_dataset_info(cfg.data.path, allow_pipe=cfg.data.allow_pipe)),
            timeout_s=timeout)


def build_source(cfg: Config, accelerator: Accelerator) -> ShardSource:
    """The run's shards as a DataSource; refuses a ``data.path`` that ``data.prepare`` has not made yet."""
    if needs_preparing(cfg.data):
        raise ConfigError(f"data.path {cfg.data.path} holds no shards yet: data.prepare={cfg.data.prepare} makes them "
                          "on first use, which distgan.train (the command or the function) does before building a "
                          f"Trainer; or run python -m distgan.prepare {' '.join(prepare_command(cfg.data))}")
    return ShardSource(cfg.data, raw=accelerator.device.type == "cuda",  # uint8, normalised on the GPU
                       need_labels=cfg.generator.conditional)


def build(cfg: Config, accelerator: Optional[Accelerator] = None, source: Optional[DataSource] = None) -> Parts:
    """The parts of a run of ``cfg`` (``source``: real batches from elsewhere, e.g. memory, instead of data.path)."""
    acc = accelerator or build_accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    batch = batch_plan(cfg.train, world)
    log.info("rank %d/%d on host %s (node %s), device %s, %d threads, per-rank batch %d", rank, world,
             socket.gethostname(), os.environ.get("SLURM_NODEID", "-"), acc.device, torch.get_num_threads(),
             batch.local_batch)
    if acc.is_main_process:
        log.info("global batch %d (%d per process x %d), lr_g %.4g, lr_d %.4g (train.lr_batch_scaling=%s)",
                 batch.global_batch, batch.local_batch, world, cfg.g_optim.lr * batch.lr_factor,
                 cfg.d_optim.lr * batch.lr_factor, cfg.train.lr_batch_scaling)
    source = source if source is not None else build_source(cfg, acc)
    # G and D work at the padded resolution; what is scored or shown is cropped back (Trainer.shown)
    resolution = padded_resolution(source.resolution, cfg.data.pad, cfg.generator, cfg.discriminator)
    num_classes = len(source.classes) if cfg.generator.conditional and source.classes else None
    check_training(cfg, resolution, source.channels, batch.local_batch, num_classes)  # before G and D are allocated
    g_cfg, d_cfg = norms_for_ranks(cfg, batch, world, announce=acc.is_main_process)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    G = build_generator(g_cfg, resolution, source.channels, num_classes)
    D = build_discriminator(d_cfg, resolution, source.channels, num_classes)
    augment = None
    if cfg.augment.policy:  # every D forward of both phases sees augmented images (distgan.augment)
        D = augment = Augmented(D, cfg.augment)
        source = RealBatchMarker(source, augment)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    G.to(memory_format=memory_format)
    D.to(memory_format=memory_format)
    ema = EMA(G, cfg.ema) if cfg.ema.enabled else None
    fused = acc.device.type in ("cpu", "cuda")
    opt_g = make_optimizer(cfg.g_optim, G.parameters(), fused=fused, lr_factor=batch.lr_factor)
    opt_d = make_optimizer(cfg.d_optim, D.parameters(), fused=fused, lr_factor=batch.lr_factor)
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    if cfg.train.compile:  # in place: DDP, the G phase's unwrapped D and the state_dict keys stay as they are
        check_cuda_graphs(cfg, acc, (g_cfg.norm, d_cfg.norm))
        acc.unwrap_model(G).compile(mode=cfg.train.compile_mode)
        acc.unwrap_model(D).compile(mode=cfg.train.compile_mode)
    if ema is not None:
        ema.model.to(acc.device)
    return Parts(acc, batch, source, resolution, num_classes, G, D, opt_g, opt_d, ema, augment,
                 GANObjective(cfg.loss), build_evaluator(cfg, acc, source, num_classes), memory_format)


def build_evaluator(cfg: Config, accelerator: Accelerator, source: DataSource, num_classes: Optional[int]):
    """The Evaluator of ``eval.metrics`` (None when it lists none); its feature network must exist (first_use)."""
    if not cfg.eval.metrics:
        return None
    from distgan.metrics.evaluator import Evaluator  # the metrics stack loads only when asked for

    info = getattr(source, "info", None)
    if info is None:
        raise ConfigError("eval.metrics needs shards with dataset.json (data.path); this data source has none")
    return Evaluator(cfg.eval, cfg.data, info, accelerator.device, cfg.run.seed, cfg.generator.z_dist, num_classes)
