"""The Trainer: Accelerator set-up, the D and G phases, and the loop.

Every precision and distribution decision sits in this file:
- ``train.batch_size`` is global; each of N processes takes batch_size / N.
- Latents (and WGAN-GP mixing weights) are drawn for the GLOBAL batch from a generator seeded by
  (seed, step, phase) and each rank takes its slice, so N processes and one process see the same numbers.
- Other randomness (dropout) is reseeded per step from (seed, step, rank): resume needs no RNG state.
- DDP: broadcast_buffers off, static_graph never; D is frozen and called unwrapped in the G phase so it
  neither accumulates nor all-reduces gradients; each penalty is added to the D loss, one backward.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distgan import losses
from distgan.checkpoint import (
    StopRequest, TrainState, export_generator, find_resume_path, list_checkpoints, load_checkpoint, read_best,
    save_best, save_checkpoint,
)
from distgan.config import Config, ConfigError, OptimizerConfig, dump_yaml
from distgan.data.source import DataSource, ShardSource
from distgan.distributed import any_rank, make_accelerator, set_cpu_threads
from distgan.ema import EMA
from distgan.metrics.registry import is_better
from distgan.nn import build_discriminator, build_generator, sample_latent
from distgan.tracking import RunLog, save_gif, save_grid, wandb_mode_for_environment

log = logging.getLogger(__name__)

PHASE_D, PHASE_G, PHASE_GP = 0, 1, 2


class NonFiniteError(RuntimeError):
    pass


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Autocast outputs (fp16/bf16) to fp32 for losses; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, phase ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, cfg: Config, source: Optional[DataSource] = None, resume: Optional[str] = None):
        self.started_at = time.time()
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.accelerator = acc = make_accelerator(cfg)
        set_cpu_threads(acc)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.local_batch = cfg.train.batch_size // self.world
        log.info(
            "rank %d/%d on host %s (node %s), device %s, %d threads, per-rank batch %d",
            self.rank, self.world, socket.gethostname(), os.environ.get("SLURM_NODEID", "-"),
            acc.device, torch.get_num_threads(), self.local_batch,
        )
        self.source = source or ShardSource(cfg.data)
        res, ch = self.source.resolution, self.source.channels
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        G = build_generator(cfg.generator, res, ch)
        D = build_discriminator(cfg.discriminator, res, ch)
        self.ema = EMA(G, cfg.ema) if cfg.ema.enabled else None
        opt_g = make_optimizer(cfg.g_optim, G.parameters())
        opt_d = make_optimizer(cfg.d_optim, D.parameters())
        self.G, self.D, self.opt_g, self.opt_d = acc.prepare(G, D, opt_g, opt_d)
        self.G_plain, self.D_plain = acc.unwrap_model(self.G), acc.unwrap_model(self.D)
        if self.ema is not None:
            self.ema.model.to(acc.device)

        self.state = TrainState(world_size=self.world)
        self.resumed_from = find_resume_path(resume, self.run_dir)
        existing = list_checkpoints(self.run_dir / "checkpoints")
        if resume is None and existing:
            raise ConfigError(
                f"run dir {self.run_dir} already has checkpoints (latest {existing[-1].name}): pass --resume auto "
                "to continue it, or choose another run.dir (nothing is overwritten)"
            )
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self.stop = StopRequest(self.run_dir)
        self.fixed_z = sample_latent(
            cfg.log.n_samples, cfg.generator.z_dim, cfg.generator.z_dist,
            torch.Generator().manual_seed(cfg.run.seed),
        ).to(acc.device)
        self.run_log: Optional[RunLog] = None
        self.evaluator = None
        if cfg.eval.metrics:
            from distgan.metrics.evaluator import Evaluator  # the metrics stack loads only when asked for

            info = getattr(self.source, "info", None)
            if info is None:
                raise ConfigError("eval.metrics needs shards with dataset.json (data.path); this data source has none")
            self.evaluator = Evaluator(cfg.eval, cfg.data, info, acc.device, cfg.run.seed, cfg.generator.z_dist)
        self.best = read_best(self.run_dir)
        self.logged_reference = False
        self.ema_beta = 0.0

    # ------------------------------------------------------------------ state

    def _modules(self) -> dict[str, torch.nn.Module]:
        modules = {"G": self.G_plain, "D": self.D_plain}
        if self.ema is not None:
            modules["G_ema"] = self.ema.model
        return modules

    def _load(self, path: Path) -> None:
        self.state, optim = load_checkpoint(path, self._modules())
        self.opt_g.load_state_dict(optim["g"])
        self.opt_d.load_state_dict(optim["d"])
        if self.accelerator.scaler is not None and optim.get("scaler"):
            self.accelerator.scaler.load_state_dict(optim["scaler"])
        if self.state.world_size != self.world:
            log.info("resuming a %d-process checkpoint on %d processes (same global batch); the data stream "
                     "restarts at the same position with this process count's split", self.state.world_size, self.world)
            self.state.world_size = self.world
        log.info("resumed from %s at step %d", path, self.state.step)

    def save(self) -> Optional[Path]:
        """All ranks call this; rank 0 writes (weights are identical on every rank), then all wait."""
        path = None
        if self.accelerator.is_main_process:
            scaler = self.accelerator.scaler
            optim = {"g": self.opt_g.state_dict(), "d": self.opt_d.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else {}}
            path = save_checkpoint(self.run_dir / "checkpoints", self.state, self._modules(), optim,
                                   self.cfg.checkpoint.keep)
            log.info("checkpoint %s", path)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ randomness

    def _global_slice(self, step: int, phase: int, sub: int, draw) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, step, phase, sub))
        full = draw(gen)
        return full[self.rank * self.local_batch:(self.rank + 1) * self.local_batch].to(self.accelerator.device)

    def _latent(self, step: int, phase: int, sub: int) -> torch.Tensor:
        g = self.cfg.generator
        return self._global_slice(step, phase, sub,
                                  lambda gen: sample_latent(self.cfg.train.batch_size, g.z_dim, g.z_dist, gen))

    # ------------------------------------------------------------------ phases

    def _grad_norm(self, model) -> torch.Tensor:
        max_norm = self.cfg.train.max_grad_norm or math.inf
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def d_step(self, real: torch.Tensor, step: int, sub: int) -> dict[str, torch.Tensor]:
        cfg, acc = self.cfg, self.accelerator
        kind, penalty = cfg.loss.kind, cfg.loss.penalty
        d_step_index = step * cfg.train.d_steps + sub
        apply_penalty = penalty != "none" and d_step_index % cfg.loss.penalty_interval == 0
        z = self._latent(step, PHASE_D, sub)
        with torch.no_grad(), acc.autocast():
            fake = self.G_plain(z)
        fake = at_least_fp32(fake)
        if apply_penalty and penalty == "r1":
            real = real.detach().requires_grad_(True)
        if apply_penalty and penalty == "r2":
            fake = fake.detach().requires_grad_(True)
        with acc.autocast():
            real_logits = self.D(real)
            fake_logits = self.D(fake)
            loss = losses.discriminator_loss(kind, at_least_fp32(real_logits), at_least_fp32(fake_logits))
        out = {"loss_d": loss.detach(), "d_real": real_logits.detach().float().mean(),
               "d_fake": fake_logits.detach().float().mean()}
        if apply_penalty:
            scale = acc.scaler.get_scale() if acc.scaler is not None else 1.0
            if penalty == "r1":
                value = losses.r1_penalty(real_logits, real, grad_scale=scale)
            elif penalty == "r2":
                value = losses.r1_penalty(fake_logits, fake, grad_scale=scale)
            else:
                alpha = self._global_slice(step, PHASE_GP, sub, lambda gen: torch.rand(cfg.train.batch_size, generator=gen))
                alpha = alpha.view(-1, *([1] * (real.dim() - 1)))
                x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
                with acc.autocast():
                    hat_logits = self.D(x_hat)
                value = losses.wgan_gp_penalty(hat_logits, x_hat, grad_scale=scale)
            loss = loss + losses.penalty_weight(penalty, cfg.loss.penalty_weight, cfg.loss.penalty_interval) * value
            out["penalty"] = value.detach()
        acc.backward(loss)
        out["grad_norm_d"] = self._grad_norm(self.D)
        out["skip"] = self._check_finite("D", step, out["loss_d"], out["grad_norm_d"])
        if not out["skip"]:
            self._optimizer_step(self.opt_d)
        self.opt_d.zero_grad(set_to_none=True)
        return out

    def g_step(self, step: int) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        self.D_plain.requires_grad_(False)  # frozen, and called unwrapped: no gradient accumulation or sync
        try:
            z = self._latent(step, PHASE_G, 0)
            with acc.autocast():
                fake_logits = self.D_plain(self.G(z))
                loss = losses.generator_loss(self.cfg.loss.kind, at_least_fp32(fake_logits))
            acc.backward(loss)
        finally:
            self.D_plain.requires_grad_(True)
        out = {"loss_g": loss.detach(), "grad_norm_g": self._grad_norm(self.G)}
        out["skip"] = self._check_finite("G", step, out["loss_g"], out["grad_norm_g"])
        if not out["skip"]:
            self._optimizer_step(self.opt_g)
        self.opt_g.zero_grad(set_to_none=True)
        return out

    def _optimizer_step(self, optimizer) -> None:
        optimizer.step()
        if self.accelerator.scaler is not None and optimizer.step_was_skipped:  # fp16 overflow: scale lowered
            self.state.overflow_steps += 1

    def _check_finite(self, phase: str, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """True when the step must be skipped; raises when the run must stop. One host sync per phase."""
        values = [loss.float()]
        if self.accelerator.scaler is None:  # under fp16 an inf gradient is an overflow the scaler skips
            values.append(grad_norm.float())
        (bad,) = any_rank(self.accelerator, not bool(torch.isfinite(torch.stack(values)).all()))
        if not bad:
            return False
        if self.cfg.train.on_nonfinite == "skip":
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite %s loss or gradient; step skipped (train.on_nonfinite=skip)", step, phase)
            return True
        raise NonFiniteError(
            f"step {step}: the {phase} loss or gradient is not finite (loss {loss.item()}, grad norm "
            f"{grad_norm.item()}). Last good checkpoint: {self._last_checkpoint()}. Lower the learning rate, add a "
            "penalty, or set train.on_nonfinite=skip."
        )

    def _last_checkpoint(self) -> str:
        found = list_checkpoints(self.run_dir / "checkpoints")
        return str(found[-1]) if found else "none yet"

    # ------------------------------------------------------------------ samples

    @torch.no_grad()
    def write_samples(self, step: int) -> dict[str, Path]:
        """Fixed-noise grids from G_ema and G, in eval mode (no collectives: main process only)."""
        samples = self.run_dir / "samples"
        written = {}
        models = {"G": self.G_plain} if self.ema is None else {"G_ema": self.ema.model, "G": self.G_plain}
        for name, model in models.items():
            was_training = model.training
            model.eval()
            images = model(self.fixed_z).float()
            model.train(was_training)
            written[f"samples/{name}"] = save_grid(images, samples / f"{name.lower()}-step-{step:08d}.png")
        return written

    def sample_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.G_plain

    # ------------------------------------------------------------------ the loop

    def _start_run_dir(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            if self.stop.file.exists() and self.stop.file.stat().st_mtime < self.started_at:
                self.stop.clear()  # only a request older than this process is stale
            if cfg.log.wandb:
                os.environ["WANDB_MODE"] = wandb_mode_for_environment()
                acc.init_trackers(cfg.log.wandb_project, config=asdict(cfg), init_kwargs={"wandb": {
                    "dir": str(self.run_dir), "name": cfg.run.name or self.run_dir.name,
                    "id": (cfg.run.name or self.run_dir.name).replace("/", "-") + f"-{cfg.run.seed}",
                    "resume": "allow"}})
            self.run_log = RunLog(self.run_dir, cfg.train.steps, self.state.step, acc, cfg.log.progress_bar)
        acc.wait_for_everyone()

    def fit(self) -> TrainState:
        cfg, acc, st = self.cfg, self.accelerator, self.state
        self._start_run_dir()
        data = self.source.batches(self.local_batch, self.rank, self.world, cfg.run.seed, st.batches_consumed)
        images_per_step = cfg.train.batch_size * cfg.train.d_steps
        window: dict[str, list[torch.Tensor]] = {}
        stopped = False
        t_start = time.perf_counter()
        if self.run_log:
            self.run_log.images_per_second(st.images_seen)
        while st.step < cfg.train.steps:
            step = st.step
            torch.manual_seed(derive_seed(cfg.run.seed, step, 1000 + self.rank))  # dropout etc.
            for sub in range(cfg.train.d_steps):
                real, _labels = next(data)
                st.batches_consumed += 1
                real = real.to(acc.device, non_blocking=True)
                self._record(window, self.d_step(real, step, sub))
            self._record(window, self.g_step(step))
            st.step += 1
            st.images_seen += images_per_step
            if self.ema is not None:
                self.ema_beta = self.ema.update(self.G_plain, st.step, images_per_step, st.images_seen)
            if self.run_log:
                self.run_log.advance()
            self._periodic(st.step, window)
            if st.step % cfg.train.stop_check_every == 0 and st.step < cfg.train.steps:
                (stopped,) = any_rank(self.accelerator, self.stop.local())
                if stopped:
                    break
        if hasattr(data, "close"):
            data.close()
        self._finish(stopped, time.perf_counter() - t_start)
        return st

    @staticmethod
    def _record(window: dict[str, list[torch.Tensor]], out: dict) -> None:
        """Keep a phase's figures for the next log line; a skipped phase's (non-finite) figures are left out."""
        if out.pop("skip"):
            return
        for k, v in out.items():
            window.setdefault(k, []).append(v.detach().float())

    def _periodic(self, step: int, window: dict) -> None:
        cfg, acc = self.cfg, self.accelerator
        last = step == cfg.train.steps
        if acc.is_main_process and (step % cfg.log.every == 0 or last):
            values = {k: torch.stack(v).mean().item() for k, v in window.items()}
            values.update(images_seen=self.state.images_seen, kimg=self.state.images_seen / 1000,
                          lr_g=self.opt_g.param_groups[0]["lr"], lr_d=self.opt_d.param_groups[0]["lr"],
                          images_per_s=self.run_log.images_per_second(self.state.images_seen),
                          skipped_steps=self.state.skipped_steps, overflow_steps=self.state.overflow_steps)
            if self.ema is not None:
                values["ema_beta"] = self.ema_beta
            if acc.scaler is not None:
                values["loss_scale"] = acc.scaler.get_scale()
            self.run_log.log(step, values)
            window.clear()
        elif not acc.is_main_process and step % cfg.log.every == 0:
            window.clear()
        if acc.is_main_process and (step % cfg.log.sample_every == 0 or last):
            self.run_log.log_images(step, self.write_samples(step))
        if self.evaluator is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or last):
            self.evaluate(step)
        if step % cfg.checkpoint.every == 0 and not last:
            self.save()

    def evaluate(self, step: int) -> dict[str, float]:
        """All ranks generate their share of G_ema's images; rank 0 logs the figures and keeps the best."""
        figures = self.evaluator.evaluate(self.sample_model(), self.rank, self.world, self.accelerator.gather)
        if self.accelerator.is_main_process:
            if not self.logged_reference:  # the real-vs-real floor, once per run
                reference = self.evaluator.reference()
                self.logged_reference = True
                if reference:
                    self.run_log.log(step, {f"eval_ref/{k}": v for k, v in reference.items()})
            self.run_log.log(step, {f"eval/{k}": v for k, v in figures.items()})
            self._keep_best(figures)
            self.run_log.images_per_second(self.state.images_seen)  # evaluation time is not training time
        return figures

    def _keep_best(self, figures: dict[str, float]) -> None:
        name = self.cfg.eval.best_metric
        if not name or not math.isfinite(figures.get(name, math.nan)):
            return
        if self.best is None or is_better(name, figures[name], self.best["value"]):
            self.best = {"metric": name, "value": figures[name], "step": self.state.step}
            save_best(self.run_dir, self.state, self._modules(), self.best)
            log.info("best %s so far: %.4g at step %d", name, figures[name], self.state.step)

    def _finish(self, stopped: bool, seconds: float) -> None:
        acc, st = self.accelerator, self.state
        path = self.save()
        if acc.is_main_process:
            if stopped:
                self.run_log.write(f"stopped at step {st.step} on request ({self.stop.reason()}); checkpoint {path}; "
                                   "continue with --resume auto")
                self.stop.clear()
            else:
                self._export()
                from distgan.plots import plot_run  # matplotlib loads only at the end of a run

                plot_run(self.run_dir)
                if self.cfg.log.gif:
                    frames = sorted((self.run_dir / "samples").glob("g_ema-step-*.png")) or sorted(
                        (self.run_dir / "samples").glob("g-step-*.png"))
                    save_gif(frames, self.run_dir / "progress.gif")
                self.run_log.write(f"done: {st.step} steps, {st.images_seen} images in {seconds:.0f} s; run dir {self.run_dir}")
            self.run_log.close()
        self.stop.restore()
        for tracker in acc.trackers:
            tracker.finish()
        acc.wait_for_everyone()

    def close(self) -> None:
        """End the process group; call once, after the last fit() of this process."""
        self.accelerator.end_training()

    def _export(self) -> None:
        export_generator(self.run_dir / "generator_ema.safetensors", self.sample_model(), self.cfg.generator,
                         self.source.resolution, self.source.channels, self.source.classes, self.state.step,
                         ema=self.ema is not None)
