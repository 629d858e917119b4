"""Every term of the D objective reaches the number it is meant to change, proven in float64.

For each loss kind and each penalty (lazy and not), GANObjective's D loss must equal the adversarial loss
plus weight x factor x interval x penalty, and D's parameter gradient must change with the penalty weight by
exactly weight x factor x interval x grad(penalty), all against tests/objective_reference.py (the formulas
written out again, with their own autograd). Then the same through one real Trainer step with plain SGD:
D's weights after a step with weight 10 and with weight 0 differ by lr x 10 x factor x interval x
grad(penalty). A penalty that is computed and logged but never added to the loss fails both.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import objective_reference as ref
from distgan.config import LossConfig, load_config
from distgan.losses import LOSS_KINDS
from distgan.objective import GANObjective
from distgan.trainer import Trainer

PENALTIES = ("r1", "r2", "wgan-gp")
B = 8  # a power of two: the fp16-style seed grad_scale / B is then exact in float64


class TinyD(nn.Module):
    """A small smooth D in float64: tanh gives every weight a second derivative, so each penalty reaches
    every layer's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(),
                                 nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def _batch(seed: int) -> tuple[TinyD, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    D = TinyD().double()
    real = torch.randn(B, 3, 2, 2, dtype=torch.float64) * 2
    fake = torch.randn(B, 3, 2, 2, dtype=torch.float64)
    alpha = torch.rand(B, dtype=torch.float64)
    return D, real, fake, alpha


def _objective(kind: str, penalty: str, weight: float, interval: int) -> GANObjective:
    return GANObjective(LossConfig(kind=kind, penalty=penalty, penalty_weight=weight, penalty_interval=interval))


def close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    """Equal up to float64 rounding of a few hundred operations on numbers of size ``scale``."""
    return bool((a - b).abs().max() <= 1e-12 * max(scale, 1.0))


@pytest.mark.parametrize("grad_scale", [1.0, 1024.0], ids=["plain", "loss-scaled"])
@pytest.mark.parametrize("interval", [1, 4], ids=["every-step", "lazy-4"])
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_d_loss_and_gradient_carry_the_weighted_penalty(kind, penalty, interval, grad_scale):
    D, real, fake, alpha = _batch(seed=3)
    params = dict(D.named_parameters())
    x_hat = alpha.view(B, 1, 1, 1) * real + (1 - alpha.view(B, 1, 1, 1)) * fake
    adversarial = ref.adversarial(kind, D, real, fake)
    value = ref.penalty(penalty, D, real, fake, x_hat)
    g_adv, g_pen = ref.parameter_gradients(adversarial, D), ref.parameter_gradients(value, D)
    assert ref.flat(g_pen).norm() > 1e-2, "the penalty must move D's weights for this test to mean anything"

    totals, grads = {}, {}
    for weight in (0.0, 10.0):
        objective = _objective(kind, penalty, weight, interval)
        assert objective.reg_interval == interval
        loss, figures = objective.discriminator(D, real, fake, regularize=True, alpha=alpha, autocast=nullcontext,
                                                grad_scale=grad_scale)
        assert close(figures["loss_d"], adversarial, 1.0), "logged loss_d is not the adversarial loss"
        assert close(figures["penalty"], value, value.item()), \
            f"logged penalty {figures['penalty'].item():.6g} != the {penalty} formula's {value.item():.6g}"
        totals[weight] = loss
        grads[weight] = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    factor = ref.FACTOR[penalty] * interval
    expected = adversarial + 10.0 * factor * value
    assert close(totals[10.0], expected, expected.abs().item()), \
        f"D loss {totals[10.0].item():.6g} != adversarial + weight x factor x interval x penalty " \
        f"= {expected.item():.6g}"
    assert close(totals[0.0], adversarial, 1.0)
    for name in params:
        step = 10.0 * factor * g_pen[name]
        assert close(grads[0.0][name], g_adv[name], 1.0), f"{name}: weight 0 must leave the adversarial gradient"
        assert close(grads[10.0][name] - grads[0.0][name], step, step.abs().max().item()), \
            f"{name}: grad(w=10) - grad(w=0) != 10 x factor x interval x grad(penalty)"


@pytest.mark.parametrize("penalty", PENALTIES)
def test_a_step_without_regularization_is_the_adversarial_loss_alone(penalty):
    D, real, fake, alpha = _batch(seed=4)
    loss, figures = _objective("hinge", penalty, 10.0, 4).discriminator(
        D, real, fake, regularize=False, alpha=alpha, autocast=nullcontext, grad_scale=1.0)
    assert "penalty" not in figures
    assert close(loss, ref.adversarial("hinge", D, real, fake), 1.0)


def test_no_penalty_never_regularizes():
    assert _objective("hinge", "none", 10.0, 4).reg_interval == 0


# ---------------------------------------------------------------- through one Trainer step

LR = 0.05


@pytest.fixture
def float64_trainer(monkeypatch):
    """Trainer runs in float64 (as tests/distributed/equivalence_run.py does) on one intra-op thread,
    without the end-of-run plots."""
    monkeypatch.setattr("distgan.build.set_cpu_threads", lambda *args: torch.get_num_threads())
    monkeypatch.setattr("distgan.plots.plot_run", lambda run_dir: None)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


BATCH = 8  # one process: D's real and fake batches


def _one_step(run_dir, penalty: str, interval: int, weight: float):
    """One training step (plain SGD on D); returns D before it, D's saved weights after it and D's inputs in the
    first D phase (real, fake and for WGAN-GP the interpolates, in call order)."""
    from tests.distributed.support import MemorySource

    norm = "layer" if penalty == "wgan-gp" else "batch"
    cfg = load_config("smoke", [
        f"run.dir={run_dir}", "train.steps=1", f"train.batch_size={BATCH}", "log.every=1", "log.sample_every=1000",
        "checkpoint.every=1000", "log.gif=false", "d_optim.name=sgd", f"d_optim.lr={LR}", "d_optim.momentum=0",
        f"loss.penalty={penalty}", f"loss.penalty_weight={weight}", f"loss.penalty_interval={interval}",
        f"discriminator.norm={norm}", "generator.width=4", "discriminator.width=4",
    ])
    trainer = Trainer(cfg, source=MemorySource())
    before = copy.deepcopy(trainer.D_plain)
    inputs = []
    hook = trainer.D_plain.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    trainer.fit()
    hook.remove()
    after = load_file(str(run_dir / "checkpoints" / "step-00000001" / "D.safetensors"))
    return before, after, inputs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("penalty, interval", [("r1", 1), ("r1", 4), ("r2", 1), ("wgan-gp", 2)])
def test_one_trainer_step_moves_d_by_the_weighted_penalty_gradient(penalty, interval, tmp_path, float64_trainer):
    D0, off, inputs = _one_step(tmp_path / "w0", penalty, interval, 0.0)
    _, on, inputs_on = _one_step(tmp_path / "w10", penalty, interval, 10.0)
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs_on)), "both runs must see the same batches"
    if inputs[0].shape[0] == 2 * BATCH:  # one D forward on real and fake together (a D without batch statistics)
        (real, fake), later = inputs[0].split(BATCH), inputs[1:]
    else:
        real, fake, later = inputs[0], inputs[1], inputs[2:]
    x_hat = later[0] if penalty == "wgan-gp" else None
    g_pen = ref.parameter_gradients(ref.penalty(penalty, D0, real, fake, x_hat), D0)
    factor = ref.FACTOR[penalty] * interval
    moved = 0.0
    for name, grad in g_pen.items():
        # SGD: p1 = p0 - lr * (g_adv + w * factor * g_pen), so the two runs differ by lr * 10 * factor * g_pen
        expected = -LR * 10.0 * factor * grad
        difference = on[name].double() - off[name].double()
        bound = 1e-12 * max(1.0, off[name].abs().max().item(), expected.abs().max().item())
        error = (difference - expected).abs().max().item()
        assert error <= bound, f"D's {name} after one step is {error:.3g} from p0 - lr (g_adv + w factor interval g_pen)"
        moved = max(moved, difference.abs().max().item())
    assert moved > 1e-4, "the penalty did not change D's weights"
