"""GPU throughput of distgan against a plain PyTorch loop doing the same math, in one run, as a Markdown table.

    python bench/gpu.py [--config cifar10] [--batches 128 512 2048] [--precisions no bf16 fp16] [--compile off on graphs]
    python bench/gpu.py --dry-run      # on CPU: the same code, a few steps, fp32, small batches (CI runs it)

For each per-GPU batch x precision x compile setting (off: eager; on: train.compile; graphs: train.compile with
train.compile_mode=reduce-overhead, CUDA graphs), the real Trainer (one process, the config's models,
losses, optimizers, EMA, checks) alternates with a hand-written loop (same models, losses, fused Adam, autocast,
GradScaler, foreach EMA). Both take their real batches as a CUDA run's shard stream hands them over: uint8 in
pinned host memory, copied with non_blocking=True and normalised on the device (a pool of 4 batches pinned
once: decoding and the stream's per-batch pinning, the data pipeline, are out of the figure). Both are measured
the same way, on steady-state steps only: a warm-up (which includes compilation), then N timed steps and a
short profiled window of the same steps. distgan's steps are ``Trainer.train_step``, the very step ``fit``
runs, on a Trainer built once (construction, the sync points, checkpoint, export and plots are left out).
Each reports images/s, the peak device memory, and the GPU busy share: device kernel time over wall time in
the profiled window.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this working tree's distgan, not an installed one

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

from distgan import losses  # noqa: E402
from distgan.config import Config, load_config  # noqa: E402
from distgan.data.stream import normalize_images  # noqa: E402
from distgan.nn import build_discriminator, build_generator, sample_latent  # noqa: E402
from distgan.build import make_optimizer  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402

RESOLUTION, CHANNELS = 32, 3  # CIFAR-10
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DRY_RUN_MODEL = ["generator.width=8", "generator.max_width=32", "discriminator.width=8", "discriminator.max_width=32"]


@dataclass
class Setting:
    batch: int
    precision: str  # "no", "bf16", "fp16"
    compile: str  # "off", "on" (torch.compile, mode default) or "graphs" (mode reduce-overhead: CUDA graphs)

    @property
    def mode(self) -> str:
        return "reduce-overhead" if self.compile == "graphs" else "default"


@dataclass
class Figures:
    images_per_s: float
    peak_mib: float
    busy: Optional[float]  # GPU busy share in [0, 1]; None without CUDA


def pinned_pool(batch_size: int, seed: int, size: int = 4) -> list[torch.Tensor]:
    """``size`` batches of random uint8 images, in pinned host memory when CUDA is present: what the shard stream
    hands a CUDA trainer (data.stream.BatchStream with raw=True)."""
    gen = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, 256, (batch_size, CHANNELS, RESOLUTION, RESOLUTION), generator=gen, dtype=torch.uint8)
            for _ in range(size)]
    return [b.pin_memory() for b in pool] if torch.cuda.is_available() else pool


class MemoryBatches:
    """A DataSource cycling through a pinned uint8 pool (the Trainer copies and normalises each on the device)."""

    resolution, channels, classes = RESOLUTION, CHANNELS, None

    def batches(self, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int):
        pool = pinned_pool(batch_size, seed)
        labels = torch.full((batch_size,), -1)
        for i in range(start_batch, 2**62):
            yield pool[i % len(pool)], labels


def configure(base: Config, s: Setting, steps: int, run_dir: str) -> Config:
    cfg = copy.deepcopy(base)
    cfg.run.dir, cfg.train.steps, cfg.train.batch_size = run_dir, steps, s.batch
    cfg.train.mixed_precision, cfg.train.compile, cfg.train.compile_mode = s.precision, s.compile != "off", s.mode
    cfg.train.batch_per_process, cfg.train.lr_batch_scaling = 0, "none"  # s.batch is the one process's batch
    cfg.log.wandb, cfg.log.progress_bar, cfg.log.gif = False, False, False
    cfg.log.sample_every = cfg.checkpoint.every = 10**9
    cfg.eval.metrics = []
    return cfg


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def busy_share(run: Callable[[], None], steps: int, seconds_per_step: float) -> Optional[float]:
    """Device kernel time of ``steps`` steps (``run``, profiled) over their UNPROFILED wall time ``seconds_per_step``
    (from the timed window): the profiler's own host overhead slows the profiled steps, so their wall time would
    understate how busy the GPU is. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        sync()
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return min(1.0, kernel_us / (steps * seconds_per_step * 1e6))


# ---------------------------------------------------------------- distgan


def distgan_run(base: Config, s: Setting, warmup: int, steps: int) -> Figures:
    """The real Trainer's step (``Trainer.train_step``, as ``fit`` runs it) on one Trainer: warm-up steps, then
    ``steps`` timed steps and a profiled window, with nothing else of a run in between."""
    with tempfile.TemporaryDirectory() as run_dir:
        AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per setting, in one process
        reset_peak()
        trainer = Trainer(configure(base, s, 10**9, run_dir), source=MemoryBatches())
        data, window = trainer.data_stream(), {}
        try:
            for _ in range(warmup):
                trainer.train_step(data, window)
            trainer.check_health()  # a sync point, as fit's log line: warm-up steps finish before the clock starts
            window.clear()
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(data, window)
            sync()
            seconds = time.perf_counter() - start
            rate = steps * trainer.global_batch * trainer.cfg.train.d_steps / seconds
            memory = peak_mib()
            profiled = max(2, steps // 4)
            busy = busy_share(lambda: [trainer.train_step(data, window) for _ in range(profiled)], profiled,
                              seconds / steps)
            trainer.check_health()  # the measured steps were finite (else NonFiniteError: no figure)
        finally:
            data.close()
            trainer.lock.release()
    return Figures(rate, memory, busy)


# ---------------------------------------------------------------- the plain loop


def plain_run(base: Config, s: Setting, warmup: int, steps: int) -> Figures:
    """The same math by hand: D phase(s) on real and detached fake images, G phase with D frozen, EMA."""
    cfg = configure(base, s, warmup + steps, "")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reset_peak()
    torch.manual_seed(0)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    G = build_generator(cfg.generator, RESOLUTION, CHANNELS).to(device, memory_format=fmt)
    D = build_discriminator(cfg.discriminator, RESOLUTION, CHANNELS).to(device, memory_format=fmt)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    if s.compile != "off":
        G.compile(mode=s.mode)
        D.compile(mode=s.mode)
    fused = device.type in ("cpu", "cuda")
    opt_g = make_optimizer(cfg.g_optim, G.parameters(), fused=fused)
    opt_d = make_optimizer(cfg.d_optim, D.parameters(), fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
    dtype = AUTOCAST[s.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    batch, z_dim = s.batch, cfg.generator.z_dim
    pool = pinned_pool(batch, cfg.run.seed)  # the Trainer's real batches: pinned uint8, copied and normalised each phase

    def real(j: int) -> torch.Tensor:
        return normalize_images(pool[j % len(pool)].to(device, non_blocking=True)).contiguous(memory_format=fmt)
    ema_params, params = list(G_ema.parameters()), list(G.parameters())
    ema_buffers, buffers = list(G_ema.buffers()), list(G.buffers())

    def phase(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def step(i: int) -> None:
        if s.compile == "graphs":
            torch.compiler.cudagraph_mark_step_begin()
        for k in range(cfg.train.d_steps):
            z = sample_latent(batch, z_dim, cfg.generator.z_dist, device=device)
            with torch.no_grad(), autocast():
                fake = G(z)
            with autocast():
                loss = losses.discriminator_loss(cfg.loss.kind, D(real(i * cfg.train.d_steps + k)), D(fake.float()))
            phase(loss, opt_d)
        D.requires_grad_(False)
        with autocast():
            loss = losses.generator_loss(cfg.loss.kind, D(G(sample_latent(batch, z_dim, cfg.generator.z_dist,
                                                                           device=device))))
        phase(loss, opt_g)
        D.requires_grad_(True)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 0.01)
            if buffers:  # G_ema's BN statistics follow G's, as distgan's EMA.update does every step
                torch._foreach_copy_(ema_buffers, buffers)

    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    seconds = time.perf_counter() - start
    rate = steps * batch * cfg.train.d_steps / seconds
    memory = peak_mib()
    profiled = max(2, steps // 4)
    busy = busy_share(lambda: [step(i) for i in range(profiled)], profiled, seconds / steps)
    return Figures(rate, memory, busy)


# ---------------------------------------------------------------- the table


def row(s: Setting, ours: Figures, plain: Figures) -> str:
    busy = lambda f: "n/a" if f.busy is None else f"{100 * f.busy:.0f}%"  # noqa: E731
    return (f"| {s.batch} | {s.precision} | {s.compile} | {ours.images_per_s:,.0f} | "
            f"{plain.images_per_s:,.0f} | {ours.images_per_s / plain.images_per_s:.2f} | {ours.peak_mib:,.0f} | "
            f"{plain.peak_mib:,.0f} | {busy(ours)} | {busy(plain)} |")


def header(args: argparse.Namespace, command: str) -> list[str]:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    return [
        f"`{command}` on {device}, torch {torch.__version__}, {datetime.date.today().isoformat()}"
        + (" (DRY RUN: CPU, a few steps; not a measurement)" if args.dry_run else ""),
        "",
        "| per-GPU batch | precision | compile | distgan img/s | plain loop img/s | ratio | distgan peak MiB | "
        "plain peak MiB | distgan GPU busy | plain GPU busy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])  # 64: the recipe's per-GPU batch
    parser.add_argument("--precisions", nargs="+", choices=sorted(AUTOCAST), default=["no", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="+", choices=["off", "on", "graphs"], default=["off", "on", "graphs"])
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation happens here)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.md"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, batch 8, compile off, 1 + 2 steps, narrow model")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    args = parser.parse_args()
    if args.dry_run:  # the same code on a narrow model: it checks the code, it measures nothing
        args.batches, args.precisions, args.compile, args.warmup, args.steps = [8], ["no"], ["off"], 1, 2
        args.overrides = DRY_RUN_MODEL + args.overrides
    elif not torch.cuda.is_available():
        parser.exit(2, "bench/gpu.py: no CUDA device here; use --dry-run to check the code on CPU\n")
    base = load_config(args.config, args.overrides)
    command = "python bench/gpu.py " + " ".join(
        [f"--config {args.config}"] + (["--dry-run"] if args.dry_run else []) + args.overrides)
    lines = header(args, command)
    print("\n".join(lines), flush=True)
    for batch in args.batches:
        for precision in args.precisions:
            for compiled in args.compile:
                s = Setting(batch, precision, compiled)
                torch._dynamo.reset()  # no setting inherits another's compiled graphs, guards or recompile budget
                ours = distgan_run(base, s, args.warmup, args.steps)
                torch._dynamo.reset()
                plain = plain_run(base, s, args.warmup, args.steps)
                lines.append(row(s, ours, plain))
                print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"table written to {args.out}")


if __name__ == "__main__":
    main()
