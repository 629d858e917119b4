"""The fp16 loss-scaler logic, on CPU: Accelerate refuses fp16 there, so the Trainer gets a CPU GradScaler by hand
(``accelerator.backward`` then scales the loss as it does on a GPU) and the phase tail runs unchanged.

- An overflowing (or NaN) D phase under train.on_nonfinite=skip: the next phase unscales its own gradients
  (before the fix, the skipped phase left the shared scaler "unscaled" and the G phase raised).
- A NaN penalty is seen (the total loss is checked, not the D loss before the penalty).
- A scale driven below 1 stops the run, naming the last good checkpoint.
- The penalty's inner backward at S = 65536 does not overflow fp16 and equals the fp32 penalty.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distgan import losses
from distgan.config import load_config
from distgan.precision import step_unless, unscale_and_norm
from distgan.trainer import NonFiniteError, StepHealth, Trainer
from tests.distributed.support import MemorySource
from tests.test_train_e2e import NaNSource


def fp16_trainer(tmp_path, source, *overrides: str, init_scale: float = 2.0**16) -> Trainer:
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "log.sample_every=1000", "checkpoint.every=1000",
                                "log.gif=false", "train.cpu_threads=1", *overrides])
    trainer = Trainer(cfg, source=source)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)  # as Accelerate's for fp16
    trainer.health = StepHealth(trainer.accelerator.device, fp16=True)
    return trainer


@pytest.mark.timeout(120)
def test_an_overflowing_phase_is_skipped_and_the_next_phase_unscales(tmp_path):
    trainer = fp16_trainer(tmp_path, NaNSource(bad_from=3), "train.steps=6", "train.on_nonfinite=skip")
    state = trainer.fit()
    assert state.step == 6 and state.overflow_steps == 3  # D phases of steps 3, 4, 5
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 / 2**3  # halved once per overflow
    steps = lambda opt: {int(s["step"]) for s in opt.optimizer.state.values()}  # noqa: E731
    assert steps(trainer.opt_d) == {3} and steps(trainer.opt_g) == {6}  # skipped steps left no trace in Adam
    for module in (trainer.G_plain, trainer.D_plain):
        assert all(torch.isfinite(p).all() for p in module.parameters())


def _nan_penalty_from_fourth_call(monkeypatch) -> None:
    real_r1 = losses.r1_penalty
    calls = []

    def r1_nan_from_fourth(logits, inputs, grad_scale=1.0):
        calls.append(1)
        value = real_r1(logits, inputs, grad_scale)
        return value * float("nan") if len(calls) > 3 else value

    monkeypatch.setattr(losses, "r1_penalty", r1_nan_from_fourth)


@pytest.mark.timeout(120)
def test_a_nan_penalty_stops_an_fp32_run(tmp_path, monkeypatch):
    """Without a loss scaler a non-finite total loss (penalty included) is an error, not a skipped phase."""
    _nan_penalty_from_fourth_call(monkeypatch)
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "log.sample_every=1000", "checkpoint.every=1000", "log.gif=false",
                                "train.cpu_threads=1", "train.steps=10", "log.every=5", "loss.penalty=r1"])
    with pytest.raises(NonFiniteError, match=r"step 3: the D loss or gradient is not finite. Last good checkpoint"):
        Trainer(cfg, source=MemorySource()).fit()


@pytest.mark.timeout(120)
def test_an_overflowing_penalty_lowers_the_scale_and_skips_under_fp16(tmp_path, monkeypatch):
    """Under fp16 a penalty whose inner backward overflowed (here: NaN from the 4th call on) makes the total loss and
    the gradients non-finite: an overflow like any other. The D phase is skipped and the scale halves, without
    train.on_nonfinite=skip; the run stops only once the scale falls below 1 or 20 phases in a row overflow."""
    _nan_penalty_from_fourth_call(monkeypatch)
    trainer = fp16_trainer(tmp_path, MemorySource(), "train.steps=8", "log.every=4", "loss.penalty=r1",
                           "loss.penalty_interval=1")
    state = trainer.fit()
    assert state.step == 8 and state.overflow_steps == 5  # the D phases of steps 3..7
    assert trainer.accelerator.scaler.get_scale() == 2.0**16 / 2**5
    steps = lambda opt: {int(s["step"]) for s in opt.optimizer.state.values()}  # noqa: E731
    assert steps(trainer.opt_d) == {3} and steps(trainer.opt_g) == {8}


@pytest.mark.timeout(120)
def test_a_scale_below_one_stops_the_run(tmp_path):
    """Every D phase overflows while G trains on: never two overflows in a row, but the scale falls below 1."""
    trainer = fp16_trainer(tmp_path, NaNSource(bad_from=0), "train.steps=20", "log.every=10",
                           "train.on_nonfinite=skip")
    with pytest.raises(NonFiniteError, match=r"step 20: .*loss scale 0.0625.*Last good checkpoint: none yet"):
        trainer.fit()


@pytest.mark.timeout(120)
def test_consecutive_overflows_stop_the_run(tmp_path, monkeypatch):
    """D and G gradients overflow every phase (NaN reals, a NaN G loss): the run stops at the first check after
    20 overflowing phases in a row, although the scale (2^100 halved 20 times) is still far above 1."""
    real_g_loss = losses.generator_loss
    monkeypatch.setattr(losses, "generator_loss", lambda kind, logits: real_g_loss(kind, logits) * float("nan"))
    trainer = fp16_trainer(tmp_path, NaNSource(bad_from=0), "train.steps=12", "log.every=10",
                           "train.on_nonfinite=skip", init_scale=2.0**100)
    with pytest.raises(NonFiniteError, match=r"step 10: .*20 overflowing phases in a row, 20 stop"):
        trainer.fit()
    assert trainer.accelerator.scaler.get_scale() == 2.0**80


def test_consecutive_overflows_are_counted_on_the_device():
    health = StepHealth(torch.device("cpu"), fp16=True)
    inf, one = torch.tensor(float("inf")), torch.tensor(1.0)
    for step in range(5):
        assert health.record(step, 0, one, inf)
    assert not health.record(5, 1, one, one)
    health.record(6, 0, one, inf)
    (row,) = health.read(_OneProcess())
    assert row == [6, 1, 5, -1, -1]  # 6 overflows, a run of 1 going on, the longest 5; no bad loss
    assert health.read(_OneProcess()) == [[0, 1, 1, -1, -1]]  # counts restart; the run goes on


class _OneProcess:
    num_processes = 1


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_phase_leaves_the_scaler_ready_for_the_next(bad, fused):
    """Two optimizers, one scaler (as Accelerate has): D's gradients overflow, then G's phase runs."""
    torch.manual_seed(0)
    d, g = nn.Linear(3, 1), nn.Linear(3, 1)
    opt_d = torch.optim.Adam(d.parameters(), fused=fused)
    opt_g = torch.optim.Adam(g.parameters(), fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in d.parameters()]
    scaler.scale(d(torch.ones(2, 3)).sum()).backward()
    d.weight.grad[0, 0] = bad
    norm = unscale_and_norm(opt_d, scaler)
    step_unless(opt_d, scaler, ~torch.isfinite(norm))
    assert all(torch.equal(a, b) for a, b in zip(before, d.parameters())) and scaler.get_scale() == 512.0
    scaler.scale(g(torch.ones(2, 3)).sum()).backward()
    norm = unscale_and_norm(opt_g, scaler)  # raised "unscale_() has already been called" before the fix
    assert norm.item() == 4.0  # unscaled: d/dw and d/db of 2 samples of ones are 2 each, sqrt(4 * 2^2)
    step_unless(opt_g, scaler, ~torch.isfinite(norm))
    assert not torch.equal(g.bias.detach(), torch.zeros(1)) and scaler.get_scale() == 512.0


class HalfCritic(nn.Module):
    """A small critic computing in fp16 (as under fp16 autocast), weights large enough to matter."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1)).to(dtype)

    def forward(self, x):
        return self.net(x.to(self.net[0].weight.dtype)).squeeze(1)


def test_the_fp16_penalty_at_the_initial_scale_does_not_overflow():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    half, full = HalfCritic(torch.float16), HalfCritic(torch.float32)
    xh, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    scale = torch.tensor(2.0**16)  # GradScaler's initial scale: above fp16's largest number (65504)
    for penalty in (losses.r1_penalty, losses.wgan_gp_penalty):
        value = penalty(half(xh), xh, grad_scale=scale)
        reference = penalty(full(xf), xf)
        assert torch.isfinite(value), f"{penalty.__name__}: the inner backward overflowed at S = 65536"
        assert value.item() == pytest.approx(reference.item(), rel=1e-2)  # fp16 arithmetic: ~1e-3
        # the penalty's own gradient (the double backward the D step takes) matches fp32 as well
        (gh,) = torch.autograd.grad(value, half.net[0].weight)
        (gf,) = torch.autograd.grad(reference, full.net[0].weight)
        assert torch.isfinite(gh).all()
        assert ((gh.float() - gf).norm() / gf.norm()).item() < 2e-2


@pytest.mark.parametrize("batch, scale", [(8, 2.0**20), (64, 2.0**22), (128, 2.0**24)])
def test_the_fp16_penalty_stays_finite_after_the_scale_has_grown(batch, scale):
    """GradScaler doubles S every 2,000 clean steps: S / B per sample alone overflowed fp16 at these sizes."""
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(3))
    half, full = HalfCritic(torch.float16), HalfCritic(torch.float32)
    xh, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for penalty in (losses.r1_penalty, losses.wgan_gp_penalty):
        value = penalty(half(xh), xh, grad_scale=torch.tensor(scale))
        reference = penalty(full(xf), xf)
        assert torch.isfinite(value), f"{penalty.__name__}: overflow at S = {scale:.0f}, B = {batch}"
        assert value.item() == pytest.approx(reference.item(), rel=1e-2)  # fp16 arithmetic: ~1e-3
