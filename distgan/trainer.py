"""The Trainer: builds G, D, G_ema and their optimizers from the config, and runs the training step.

One step is a schedule of phases (stylegan2-ada's phases as data): ``train.d_steps`` D phases, each on a
fresh real batch, then one G phase, then the EMA update. What a phase computes is the GANObjective's
business; how it ends (one backward, gradient norm and clipping, the finite check, the optimizer step) is
one shared tail. The GAN step's distribution decisions sit here (process and precision set-up is in
distgan.distributed):
- The global batch is ``train.batch_size`` (or ``train.batch_per_process`` x N, distgan.distributed.batch_plan);
  each of N processes takes a 1/N share.
- Latents (and WGAN-GP mixing weights) are drawn on the device for the GLOBAL batch from a generator seeded
  by (seed, step, phase) and each rank takes its slice, so N processes and one process see the same numbers.
- No host sync per step: finiteness and fp16 overflows are counted on the device (``StepHealth``), a phase
  with non-finite gradients is skipped on the device (fused optimizers), and the counts are read at the
  sync points (log, samples, evaluation, checkpoint, end), where G's BN buffers are also averaged over ranks.
- Other randomness (dropout) is reseeded per step from (seed, step, rank): resume needs no RNG state.
- D is frozen and called unwrapped in the G phase, so it neither accumulates nor all-reduces gradients.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from distgan.checkpoint import TrainState, list_checkpoints, load_checkpoint, read_best, save_best, save_checkpoint
from distgan.build import Parts, build, uses_cuda_graphs
from distgan.config import Config, ConfigError, dump_yaml
from distgan.console import say
from distgan.data.stream import DataSource, normalize_images, pad_images
from distgan.distributed import average_buffers, broadcast_from_main, on_main_process
from distgan.errors import UserError
from distgan.export import EXPORT_FILE, export_generator, generator_metadata
from distgan.metrics.registry import is_better
from distgan.nn import cropped, sample_labels, sample_latent
from distgan.objective import Figures, call
from distgan.precision import loss_scale, step_unless, unscale_and_norm
from distgan.health import StepHealth
from distgan.rundir import RunDirLock, claim_run_dir, record_config
from distgan.stop import Interrupted, StopRequest, StopVote
from distgan.tracking import (
    RunLog, end_lines, init_trackers, sample_grids, save_gif, save_grid, tracker_config, wandb_init_kwargs,
    wandb_mode_for_environment,
)

log = logging.getLogger(__name__)

# stream ids of the per-step random draws: (seed, step, stream, sub-step) -> numbers
DRAW_D_LATENT, DRAW_G_LATENT, DRAW_GP_ALPHA, DRAW_D_LABEL, DRAW_G_LABEL = 0, 1, 2, 3, 4
# fp16: this many overflowing phases in a row stop the run (from the initial scale 65536, 17 halvings reach 1)
MAX_CONSECUTIVE_OVERFLOWS = 20


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Phase:
    """One optimizer's turn in a training step."""

    name: str  # "d" or "g": the suffix of its figures (loss_d, grad_norm_d)
    module: nn.Module  # the prepared (DDP-wrapped) network this phase trains
    optimizer: torch.optim.Optimizer
    repeats: int = 1  # runs per training step, each on a fresh real batch (train.d_steps for D)
    reg_interval: int = 0  # every k-th run (counted over the whole training) adds the lazy penalty; 0: never
    frozen: Optional[nn.Module] = None  # held without gradients during the phase (D while G trains)

    def regularizes(self, run_index: int) -> bool:
        return self.reg_interval > 0 and run_index % self.reg_interval == 0


@contextmanager
def frozen(module: Optional[nn.Module]) -> Iterator[None]:
    if module is None:
        yield
        return
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, phase ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    """Trains the parts of a run (``distgan.build``): ``Trainer(cfg).fit()``, or ``Trainer(cfg, parts=build(cfg))``.

    ``source``: real batches from elsewhere (e.g. memory) instead of ``data.path``; ``resume``: ``auto`` or a
    checkpoint path. First-use work (``data.prepare``, the feature classifier) is ``distgan.build.first_use``'s,
    done before (``distgan.train`` does both)."""

    def __init__(self, cfg: Config, source: Optional[DataSource] = None, resume: Optional[str] = None,
                 parts: Optional[Parts] = None):
        self.started_at = time.time()
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        parts = parts or build(cfg, source=source)
        self.accelerator = acc = parts.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.batch = parts.batch
        self.global_batch, self.local_batch = self.batch.global_batch, self.batch.local_batch
        self.source, self.pad, self.resolution = parts.source, cfg.data.pad, parts.resolution
        self.classes, self.num_classes = self.source.classes, parts.num_classes
        self.G, self.D, self.opt_g, self.opt_d = parts.G, parts.D, parts.opt_g, parts.opt_d
        self.G_plain, self.D_plain = acc.unwrap_model(self.G), acc.unwrap_model(self.D)
        self.ema, self.augment, self.objective = parts.ema, parts.augment, parts.objective
        self.evaluator, self.memory_format = parts.evaluator, parts.memory_format
        self.d_phase = Phase("d", self.D, self.opt_d, repeats=cfg.train.d_steps,
                             reg_interval=self.objective.reg_interval)
        self.g_phase = Phase("g", self.G, self.opt_g, frozen=self.D_plain)
        self.health = StepHealth(acc.device, fp16=acc.scaler is not None)
        self.cuda_graphs = uses_cuda_graphs(cfg)

        self.state = TrainState(world_size=self.world)
        self.lock = RunDirLock(self.run_dir)
        resume_path = on_main_process(acc, lambda: claim_run_dir(self.lock, resume, dump_yaml(cfg)))
        self.resumed_from = Path(resume_path) if resume_path is not None else None
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self.stop = StopRequest(self.run_dir)
        self.fixed_z = sample_latent(
            cfg.log.n_samples, cfg.generator.z_dim, cfg.generator.z_dist,
            torch.Generator().manual_seed(cfg.run.seed),
        ).to(acc.device)
        # a conditional grid cycles through the classes: 0, 1, ..., K-1, 0, 1 ...
        self.fixed_y = (torch.arange(cfg.log.n_samples, device=acc.device) % self.num_classes
                        if self.num_classes else None)
        self.run_log: Optional[RunLog] = None
        self.best = read_best(self.run_dir)
        self.last_eval: Optional[tuple[int, dict[str, float]]] = None  # (step, figures) of the latest evaluation
        self.logged_reference = False
        self.ema_beta = 0.0

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        """Train to train.steps, or until a stop request (then a checkpoint); a second Ctrl-C aborts at once,
        releasing the run dir's lock (KeyboardInterrupt goes on to the caller)."""
        try:
            return self._fit()
        except KeyboardInterrupt:
            self.lock.release()
            self.stop.restore()
            raise

    def _fit(self) -> TrainState:
        cfg, st = self.cfg, self.state
        self._start_run_dir()
        data = self.data_stream()
        self.stop_vote = StopVote(self.accelerator.device, self.world)
        window: dict[str, list[tuple[Tensor, Tensor]]] = {}  # (figure, phase skipped) since the last log line
        stopped = False
        started = time.perf_counter()

        def every(n: int) -> bool:  # the last step always logs, samples and evaluates
            return st.step % n == 0 or st.step == cfg.train.steps

        while st.step < cfg.train.steps:
            self.train_step(data, window)
            # --- sync points: health check (and BN buffers); log, samples, evaluation, checkpoint; stop request
            log_due, sample_due = every(cfg.log.every), every(cfg.log.sample_every)
            # the last step's evaluation runs in _finish, after the final checkpoint and the export
            eval_due = (self.evaluator is not None and st.step < cfg.train.steps
                        and bool(cfg.eval.every) and every(cfg.eval.every))
            save_due = st.step % cfg.checkpoint.every == 0 and st.step < cfg.train.steps
            if log_due or sample_due or eval_due or save_due:
                self.check_health()
            if sample_due or eval_due or save_due:
                self.sync_buffers()
            if log_due:
                self.log_figures(window)
            if sample_due and self.accelerator.is_main_process:
                self.run_log.log_images(st.step, self.write_samples(st.step))
            if eval_due:
                self.evaluate(st.step)
            if save_due:
                self.save()
            if st.step % cfg.train.stop_check_every == 0 and st.step < cfg.train.steps and self.stop_requested():
                stopped = True
                break
        if hasattr(data, "close"):
            data.close()
        self.check_health()
        self.sync_buffers()
        self._finish(stopped, time.perf_counter() - started)
        if stopped and self.stop.interrupted():
            raise Interrupted(signal.SIGINT)  # Ctrl-C, after the checkpoint: the caller's KeyboardInterrupt
        return st

    def data_stream(self) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's real batches from where the run stands (a resumed run continues its stream)."""
        return self.source.batches(self.local_batch, self.rank, self.world, self.cfg.run.seed,
                                   self.state.batches_consumed)

    def train_step(self, data: Iterator[tuple[Tensor, Tensor]], window: dict[str, list[tuple[Tensor, Tensor]]]) -> None:
        """One training step without a host sync: D phase(s), each on a fresh real batch, the G phase, G_ema.
        ``fit`` runs it between its sync points; bench/gpu.py times it alone."""
        cfg, st = self.cfg, self.state
        step, images_per_step = st.step, self.global_batch * cfg.train.d_steps
        torch.manual_seed(derive_seed(cfg.run.seed, step, 1000 + self.rank))  # dropout etc.
        if self.cuda_graphs:  # a new step: graph outputs of the last one may be overwritten (G's no-grad forward
            torch.compiler.cudagraph_mark_step_begin()  # runs with no backward, so the trees cannot tell by themselves)
        # --- D phase(s), each on a fresh real batch
        for sub in range(self.d_phase.repeats):
            real, labels = self._next_real(data)
            self._run_phase(self.d_phase, step, window, lambda: self._d_loss(real, labels, step, sub))
        # --- G phase
        self._run_phase(self.g_phase, step, window, lambda: self._g_loss(step))
        st.step += 1
        st.images_seen += images_per_step
        # --- G_ema
        if self.ema is not None:
            self.ema_beta = self.ema.update(self.G_plain, st.step, images_per_step, st.images_seen)
        if self.run_log:
            self.run_log.advance()

    def check_health(self) -> None:
        """Read the device counts of non-finite phases and fp16 overflows (one gather); stop the run when it must."""
        rows = self.health.read(self.accelerator)
        count, longest = rows[0][0], rows[0][2]  # gradients are all-reduced: the same on every rank
        bad = [(row[3], row[4]) for row in rows if row[3] >= 0]
        st, scaler = self.state, self.accelerator.scaler
        if scaler is not None:
            st.overflow_steps += count
            scale = scaler.get_scale()
            if longest >= MAX_CONSECUTIVE_OVERFLOWS or scale < 1.0:
                raise NonFiniteError(
                    f"step {st.step}: the fp16 gradients keep overflowing (loss scale {scale:g}, below 1 stops; "
                    f"{longest} overflowing phases in a row, {MAX_CONSECUTIVE_OVERFLOWS} stop). Last good checkpoint: "
                    f"{self._last_checkpoint()}. Lower the learning rate, add a penalty, or train in bf16 "
                    "(train.mixed_precision=bf16)."
                )
        else:
            st.skipped_steps += count
        if not bad:
            return
        step, phase = min(bad)
        if self.cfg.train.on_nonfinite == "skip":
            log.warning("step %d: non-finite %s loss or gradient; %d phases skipped since the last check "
                        "(train.on_nonfinite=skip)", step, "DG"[phase], count)
            return
        raise NonFiniteError(
            f"step {step}: the {'DG'[phase]} loss or gradient is not finite. Last good checkpoint: "
            f"{self._last_checkpoint()}. Lower the learning rate, add a penalty, or set train.on_nonfinite=skip."
        )

    def sync_buffers(self) -> None:
        """G's and D's BN running statistics averaged over ranks, and G_ema's copied from G's (one all-reduce)."""
        average_buffers(self.accelerator, self.G_plain, self.D_plain)
        if self.ema is not None:
            self.ema.copy_buffers(self.G_plain)

    def stop_requested(self) -> bool:
        """A stop signal or STOP file on any rank, as of the previous check (StopVote: no blocking copy)."""
        return self.stop_vote(self.stop.local())

    # ------------------------------------------------------------------ phases

    def _next_real(self, data) -> tuple[Tensor, Optional[Tensor]]:
        """The next real batch on the device, with its labels when the GAN is conditional (else None)."""
        real, labels = next(data)
        self.state.batches_consumed += 1
        device = self.accelerator.device
        real = real.to(device, non_blocking=True)
        if real.dtype == torch.uint8:
            real = normalize_images(real)
        real = pad_images(real, self.pad)  # after normalising: the same numbers from either path
        labels = labels.to(device, non_blocking=True) if self.num_classes else None
        return real.contiguous(memory_format=self.memory_format), labels

    def _d_loss(self, real: Tensor, real_labels: Optional[Tensor], step: int, sub: int) -> tuple[Tensor, Figures]:
        acc = self.accelerator
        fake_labels = self._labels(step, DRAW_D_LABEL, sub)
        with torch.no_grad(), acc.autocast():
            fake = call(self.G_plain, self._latent(step, DRAW_D_LATENT, sub), fake_labels)
        regularize = self.d_phase.regularizes(step * self.d_phase.repeats + sub)
        alpha = None
        if regularize and self.objective.needs_alpha:
            alpha = self._global_slice(step, DRAW_GP_ALPHA, sub, lambda gen: torch.rand(
                self.global_batch, generator=gen, device=gen.device))
        return self.objective.discriminator(self.D, real, fake, regularize=regularize, alpha=alpha,
                                            autocast=acc.autocast, grad_scale=loss_scale(acc.scaler),
                                            real_labels=real_labels, fake_labels=fake_labels)

    def _g_loss(self, step: int) -> tuple[Tensor, Figures]:
        z = self._latent(step, DRAW_G_LATENT, 0)
        return self.objective.generator(self.D_plain, self.G, z, self.accelerator.autocast,
                                        self._labels(step, DRAW_G_LABEL, 0))

    def _run_phase(self, phase: Phase, step: int, window: dict[str, list[tuple[Tensor, Tensor]]],
                   compute: Callable[[], tuple[Tensor, Figures]]) -> None:
        """The tail every phase shares: one backward; unscale (fp16) and norm (and clip) this phase's gradients
        only; count non-finite values on the device; the optimizer step, skipped on the device when the
        gradients are not finite; the loss scaler's update either way. No host sync."""
        acc = self.accelerator
        with frozen(phase.frozen):
            loss, figures = compute()
            acc.backward(loss)
        optimizer = phase.optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper
        grad_norm = unscale_and_norm(optimizer, acc.scaler, self.cfg.train.max_grad_norm)
        figures[f"grad_norm_{phase.name}"] = grad_norm
        skip = self.health.record(step, "dg".index(phase.name), loss, grad_norm)  # the total loss, penalty included
        step_unless(optimizer, acc.scaler, skip)
        for key, value in figures.items():
            window.setdefault(key, []).append((value.float(), skip))  # figures are detached: no kernel in fp32
        phase.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ randomness

    def _global_slice(self, step: int, stream: int, sub: int, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
        """This rank's slice of numbers drawn on the device for the GLOBAL batch: the same for any process count
        (on one device type), with no host-to-device copy."""
        gen = torch.Generator(self.accelerator.device).manual_seed(derive_seed(self.cfg.run.seed, step, stream, sub))
        return draw(gen)[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    def _latent(self, step: int, stream: int, sub: int) -> Tensor:
        g = self.cfg.generator
        return self._global_slice(step, stream, sub,
                                  lambda gen: sample_latent(self.global_batch, g.z_dim, g.z_dist, gen))

    def _labels(self, step: int, stream: int, sub: int) -> Optional[Tensor]:
        """The fake batch's classes (drawn for the global batch like the latents); None when unconditional."""
        if not self.num_classes:
            return None
        return self._global_slice(step, stream, sub,
                                  lambda gen: sample_labels(self.global_batch, self.num_classes, gen))

    # ------------------------------------------------------------------ what a step leaves behind

    def log_figures(self, window: dict[str, list[tuple[Tensor, Tensor]]]) -> None:
        """One metrics.jsonl line (and wandb point) of the figures since the last one, skipped phases left out
        (NaN when all were); main process only."""
        st, acc = self.state, self.accelerator
        if acc.is_main_process:
            means = []
            for pairs in window.values():
                values, kept = torch.stack([v for v, _ in pairs]), ~torch.stack([s for _, s in pairs])
                means.append(torch.where(kept, values, 0.0).sum() / kept.sum())
            values = dict(zip(window, torch.stack(means).tolist())) if means else {}
            values.update(images_seen=st.images_seen, kimg=st.images_seen / 1000,
                          lr_g=self.opt_g.param_groups[0]["lr"], lr_d=self.opt_d.param_groups[0]["lr"],
                          images_per_s=self.run_log.images_per_second(st.images_seen),
                          skipped_steps=st.skipped_steps, overflow_steps=st.overflow_steps)
            if self.ema is not None:
                values["ema_beta"] = self.ema_beta
            if acc.scaler is not None:
                values["loss_scale"] = acc.scaler.get_scale()
            if self.augment is not None:
                values.update(self.augment.figures())
            self.run_log.log(st.step, values)
        window.clear()

    @torch.no_grad()
    def write_samples(self, step: int) -> dict[str, Path]:
        """Fixed-noise grids from G_ema and G, in eval mode (no collectives: main process only)."""
        samples = self.run_dir / "samples"
        written = {}
        models = {"G": self.G_plain} if self.ema is None else {"G_ema": self.ema.model, "G": self.G_plain}
        for name, model in models.items():
            was_training = model.training
            model.eval()
            images = call(self.shown(model), self.fixed_z, self.fixed_y).float()
            model.train(was_training)
            written[f"samples/{name}"] = save_grid(images, samples / f"{name.lower()}-step-{step:08d}.png")
        return written

    def sample_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.G_plain

    def shown(self, generator: nn.Module) -> nn.Module:
        """``generator`` as scored and shown: its images cropped back to the data's resolution (data.pad)."""
        return cropped(generator, self.pad)

    def evaluate(self, step: int) -> dict[str, float]:
        """All ranks generate their share of G_ema's images; rank 0 logs the figures and keeps the best."""
        figures = self.evaluator.evaluate(self.shown(self.sample_model()), self.rank, self.world, self.accelerator.gather)
        if self.accelerator.is_main_process:
            if not self.logged_reference:  # the real-vs-real floor, once per run
                reference = self.evaluator.reference()
                self.logged_reference = True
                if reference:
                    self.run_log.log(step, {f"eval_ref/{k}": v for k, v in reference.items()})
            self.run_log.log(step, {f"eval/{k}": v for k, v in figures.items()})
            self.last_eval = (step, figures)
            self._keep_best(figures)
            self.run_log.images_per_second(self.state.images_seen)  # evaluation time is not training time
        return figures

    def _keep_best(self, figures: dict[str, float]) -> None:
        name = self.cfg.eval.best_metric
        if not name or not math.isfinite(figures.get(name, math.nan)):
            return
        if self.best is None or self.best["metric"] != name or is_better(name, figures[name], self.best["value"]):
            self.best = {"metric": name, "value": figures[name], "step": self.state.step}
            save_best(self.run_dir, self.state, self._modules(), self.best, self._generator_metadata())
            log.info("best %s so far: %.4g at step %d", name, figures[name], self.state.step)

    # ------------------------------------------------------------------ checkpoints

    def _modules(self) -> dict[str, nn.Module]:
        modules = {"G": self.G_plain, "D": self.D_plain}
        if self.ema is not None:
            modules["G_ema"] = self.ema.model
        return modules

    def _load(self, path: Path) -> None:
        self.state, optim = load_checkpoint(path, self._modules())
        per_process = self.cfg.train.batch_per_process
        if per_process and self.state.world_size != self.world:
            self.lock.release()
            raise ConfigError(
                f"resuming {path} on {self.world} processes: it was trained on {self.state.world_size} with "
                f"train.batch_per_process={per_process}, so the global batch (and lrs, train.lr_batch_scaling) would "
                f"change from {per_process * self.state.world_size} to {self.global_batch} mid-run. Resume on "
                f"{self.state.world_size} processes, or start a new run.dir"
            )
        self.opt_g.load_state_dict(optim["g"])
        self.opt_d.load_state_dict(optim["d"])
        for opt, lr in ((self.opt_g, self.cfg.g_optim.lr), (self.opt_d, self.cfg.d_optim.lr)):
            for group in opt.param_groups:  # the config's lr (a resumable change), not the one saved
                group["lr"] = lr * self.batch.lr_factor
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
                                   self.cfg.checkpoint.keep, config_yaml=dump_yaml(self.cfg),
                                   metadata=self._generator_metadata())
            log.info("checkpoint %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def _last_checkpoint(self) -> str:
        found = list_checkpoints(self.run_dir / "checkpoints")
        return str(found[-1]) if found else "none yet"

    # ------------------------------------------------------------------ start and end of a run

    def _start_run_dir(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record_config(self.run_dir, dump_yaml(cfg), self.state.step, resumed=self.resumed_from is not None)
            if self.stop.file.exists() and self.stop.file.stat().st_mtime < self.started_at:
                self.stop.clear()  # only a request older than this process is stale
            if cfg.log.wandb or cfg.log.tensorboard:
                os.environ["WANDB_MODE"] = wandb_mode_for_environment()
                wandb_kwargs = wandb_init_kwargs(cfg.log, cfg.run.name or self.run_dir.name, self.run_dir) \
                    if cfg.log.wandb else {}
                init_trackers(acc, cfg.log.wandb_project, tracker_config(cfg), wandb_kwargs)  # offline if unreachable
            self.run_log = RunLog(self.run_dir, cfg.train.steps, self.state.step, acc, cfg.log.progress_bar)
            self.run_log.images_per_second(self.state.images_seen)
        acc.wait_for_everyone()

    def _finish(self, stopped: bool, seconds: float) -> None:
        """The last checkpoint (unless the stop came right after one) and, for a finished run, the export; only then
        what may fail without costing them: the last evaluation, the plots and the GIF (their error is raised once
        the run is closed). Trackers finish (wandb prints its summary) before the last lines say where to look."""
        acc, st = self.accelerator, self.state
        # a stop is checked after the step's checkpoint: at a multiple of checkpoint.every it is already written
        saved_at_stop = stopped and st.step % self.cfg.checkpoint.every == 0
        path = self._last_checkpoint() if saved_at_stop else self.save()
        failure: Optional[Exception] = None
        exported = False
        if not stopped:
            failure = self._on_main_process_alone(self._export)
            exported = failure is None
            if failure is None:
                try:
                    if self.evaluator is not None:
                        self.evaluate(st.step)  # every rank: a collective
                except Exception as err:  # reported after the run is closed: the checkpoint and export are written
                    failure = err
                failure = failure or self._on_main_process_alone(self._plots)
        lines: list[str] = []
        if acc.is_main_process:
            if stopped:
                lines.append(f"stopped at step {st.step} on request ({self.stop.reason()}); checkpoint {path}; "
                             "continue with --resume auto")
                self.stop.clear()
            elif failure is not None:
                written = f"checkpoint {path}" + (f" and export {self.run_dir / EXPORT_FILE}" if exported else "")
                lines.append(f"trained {st.step} steps; {written} written; "
                             f"{'the end of the run' if exported else 'the export'} failed: "
                             f"{(str(failure).strip().splitlines() or [type(failure).__name__])[-1]}")
            else:
                lines.append(f"done: {st.step} steps, {st.images_seen} images in {seconds:.0f} s; "
                             f"run dir {self.run_dir}")
                final = self.last_eval[1] if self.last_eval is not None and self.last_eval[0] == st.step else None
                from distgan.metrics.cache import find_classifier  # the metrics stack loads only at the end

                scorable = find_classifier(self.cfg.data.path) is not None
                lines += end_lines(self.run_dir, st.step, final, self.classes, scorable)
            self.run_log.close()
        self.stop.restore()
        for tracker in acc.trackers:
            tracker.finish()
        if acc.is_main_process:
            for line in lines:
                say(line)
            self.lock.release()
        acc.wait_for_everyone()
        if failure is not None:
            raise failure

    def _on_main_process_alone(self, work: Callable[[], object]) -> Optional[Exception]:
        """WORK (export, plots, GIF) on the main process while the others wait on gloo up to data.prepare_timeout_s
        (distributed.main_process_work). Its error is returned, not raised, on every rank: the main process's own,
        the others one of the same kind (the user's to fix, or not) naming it, so that all ranks take the same path
        after it (a rank that went on to the last evaluation's collectives alone would wait for the others until
        train.collective_timeout_s)."""
        error: list[Optional[Exception]] = [None]

        def attempt() -> Optional[tuple[str, bool]]:
            try:
                work()
            except Exception as err:
                error[0] = err
                return (str(err).strip().splitlines() or [type(err).__name__])[-1], isinstance(err, UserError)
            return None

        failed = broadcast_from_main(self.accelerator, attempt, self.cfg.data.prepare_timeout_s)
        if failed is None:
            return None
        message, users = failed
        return error[0] or (UserError if users else RuntimeError)(f"the main process failed: {message}")

    def _plots(self) -> None:
        from distgan.plots import plot_run  # matplotlib loads only at the end of a run

        plot_run(self.run_dir)
        if self.cfg.log.gif:
            save_gif(sample_grids(self.run_dir), self.run_dir / "progress.gif")

    def close(self) -> None:
        """End the process group; call once, after the last fit() of this process."""
        self.accelerator.end_training()

    def _generator_metadata(self) -> dict[str, dict]:
        """Per checkpoint file, what rebuilds its generator (an export's metadata): every checkpoint samples."""
        def meta(ema: bool) -> dict:
            return generator_metadata(self.cfg.generator, self.resolution, self.source.channels, self.source.classes,
                                      self.state.step, ema=ema, pad=self.pad)
        return {"G": meta(False), **({"G_ema": meta(True)} if self.ema is not None else {})}

    def _export(self) -> None:
        export_generator(self.run_dir / EXPORT_FILE, self.sample_model(), self.cfg.generator,
                         self.resolution, self.source.channels, self.source.classes, self.state.step,
                         ema=self.ema is not None, pad=self.pad)
