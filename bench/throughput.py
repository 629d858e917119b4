"""Training throughput of distgan against a plain PyTorch loop doing the same math, in one run.

    python bench/throughput.py --config fashion_mnist --steps 100 [section.key=value ...]

distgan runs the real Trainer on the config's shards (data pipeline, checks, EMA, logging, a checkpoint at
the end). The plain loop uses the same models, losses, optimizers and EMA on batches already in memory, done the
same fast way distgan does them: fused Adam/SGD where distgan uses it (CPU and CUDA) and a multi-tensor
(foreach) EMA, so the ratio measures distgan's overhead, not a slower baseline.
The two alternate (distgan, plain, distgan, plain) so machine noise hits both; the ratio is the figure.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this working tree's distgan, not an installed one

import torch  # noqa: E402

from distgan import losses  # noqa: E402
from distgan.config import load_config  # noqa: E402
from distgan.nn import build_discriminator, build_generator, sample_latent  # noqa: E402
from distgan.data.stream import ShardSource  # noqa: E402
from distgan.distributed import batch_plan  # noqa: E402
from distgan.tracking import read_metrics  # noqa: E402
from distgan.build import make_optimizer  # noqa: E402
from distgan.trainer import Trainer  # noqa: E402


def torch_spectral_discriminator(cfg, resolution: int, channels: int) -> torch.nn.Module:
    """The config's D with torch's spectral norm on every conv and linear layer, as people write it (its power
    iteration runs in every training forward) instead of distgan's (one per D update)."""
    D = build_discriminator(dataclasses.replace(cfg, norm="none"), resolution, channels)  # the same layers, no SN
    for layer in list(D.modules()):
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.utils.parametrizations.spectral_norm(layer)
    return D


def plain_loop(cfg, source, steps: int, torch_spectral: bool = False) -> float:
    """Images per second of a hand-written loop: D step (real + detached fake), G step, EMA."""
    torch.manual_seed(0)
    G = build_generator(cfg.generator, source.resolution, source.channels)
    if torch_spectral and cfg.discriminator.norm == "spectral":
        D = torch_spectral_discriminator(cfg.discriminator, source.resolution, source.channels)
    else:
        D = build_discriminator(cfg.discriminator, source.resolution, source.channels)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    plan = batch_plan(cfg.train, 1)  # the Trainer's global batch and lrs on one process
    # fused as in the Trainer, which fuses on CPU and CUDA (this loop runs on the CPU)
    opt_g = make_optimizer(cfg.g_optim, G.parameters(), fused=True, lr_factor=plan.lr_factor)
    opt_d = make_optimizer(cfg.d_optim, D.parameters(), fused=True, lr_factor=plan.lr_factor)
    ema_params, params = list(G_ema.parameters()), list(G.parameters())
    ema_buffers, buffers = list(G_ema.buffers()), list(G.buffers())
    beta = 0.99  # distgan's beta varies with the step; its cost does not
    batch, z_dim = plan.global_batch, cfg.generator.z_dim
    stream = source.batches(batch, 0, 1, 0, 0)
    reals = [next(stream)[0] for _ in range(8)]  # in memory: the loop measures the math only
    if hasattr(stream, "close"):
        stream.close()

    def step(i: int) -> None:
        for k in range(cfg.train.d_steps):
            z = sample_latent(batch, z_dim, cfg.generator.z_dist)
            with torch.no_grad():
                fake = G(z)
            loss = losses.discriminator_loss(cfg.loss.kind, D(reals[(i + k) % 8]), D(fake))
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_d.step()
        D.requires_grad_(False)
        loss = losses.generator_loss(cfg.loss.kind, D(G(sample_latent(batch, z_dim, cfg.generator.z_dist))))
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        D.requires_grad_(True)
        with torch.no_grad():  # distgan's EMA.update: p_ema <- p.lerp(p_ema, beta), all tensors at once; buffers copied
            torch._foreach_copy_(ema_params, torch._foreach_lerp(params, ema_params, beta))
            if buffers:
                torch._foreach_copy_(ema_buffers, buffers)

    for i in range(3):  # warm-up
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch * cfg.train.d_steps / (time.perf_counter() - start)


def distgan_loop(cfg, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = copy.deepcopy(cfg)
        # the config's own log cadence (capped at STEPS), so distgan pays for its logging as a real run does: the
        # first log line closes the warm-up window, the others measure at least STEPS steps
        every = min(cfg.log.every, steps)
        cfg.run.dir, cfg.train.steps, cfg.log.every = run_dir, every * (1 + math.ceil(steps / every)), every
        cfg.log.wandb, cfg.log.progress_bar, cfg.log.gif = False, False, False
        cfg.log.sample_every = cfg.checkpoint.every = 10**9
        trainer = Trainer(cfg)
        trainer.fit()
        records = read_metrics(trainer.run_dir / "metrics.jsonl")
        seen = records[-1]["images_seen"] - records[0]["images_seen"]
        rates = [r["images_per_s"] for r in records[1:]]
        seconds = sum((b["images_seen"] - a["images_seen"]) / r for a, b, r in zip(records, records[1:], rates))
        return seen / seconds


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--torch-spectral-norm", action="store_true",
                        help="the plain loop's D uses torch's spectral_norm (an iteration per forward), as people write it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    source = ShardSource(cfg.data)
    print(f"config {args.config} {' '.join(args.overrides)}: batch {cfg.train.batch_size}, "
          f"{source.resolution}x{source.resolution}x{source.channels}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    ours, plain = [], []
    for _ in range(args.rounds):
        ours.append(distgan_loop(cfg, args.steps))
        plain.append(plain_loop(cfg, source, args.steps, args.torch_spectral_norm))
        print(f"  round: distgan {ours[-1]:.0f} img/s, plain loop {plain[-1]:.0f} img/s")
    best_ours, best_plain = max(ours), max(plain)
    print(f"distgan {best_ours:.0f} img/s, plain PyTorch loop {best_plain:.0f} img/s, ratio {best_ours / best_plain:.2f}")


if __name__ == "__main__":
    main()
