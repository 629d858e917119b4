"""Every choice in the config schema, trained for two steps through the real Trainer.

A matrix of override lists on tiny models: each case must give finite losses, a final checkpoint and the
exported generator, G and D weights that moved (a trainer whose optimizers never step fails every case),
and what its options imply: the norm layers, optimisers and latents built, first losses at the configured
kind's level, penalty lines, EMA beta, images seen, clipped updates. And what each option changed, seen from
outside the trainer (``Recorder``): D's first gradient is the one its loss kind and penalty give (computed again
by tests/objective_reference.py), each optimizer stepped as often as train.d_steps says, G_ema is the EMA of
G's trajectory, D saw images of the padded size, the layers carry the configured activation and upsampling.
These prove plumbing, not learning (tests/test_learning.py does that). Refused combinations are asserted to raise
their ConfigError. A meta-test walks every key with choices (registries and ``Literal`` types,
``config.key_choices``) and fails when a value is trained by no case here (nor by a named test elsewhere);
tests/test_configs.py does the same for configs/.
"""
from __future__ import annotations

import copy
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

import objective_reference as ref
from compare import assert_same_tensors
from conftest import REPO
from distgan.config import Config, ConfigError, key_choices, load_config
from distgan.data.shards import write_shards
from distgan.data.stream import BACKGROUND
from distgan.nn import SyncBatchNorm
from distgan.nn.dcgan import BASE_SIZE
from distgan.trainer import Trainer

TINY = (
    "generator.width=4", "generator.max_width=32", "generator.z_dim=8", "generator.hidden=[16,16]",
    "discriminator.width=4", "discriminator.max_width=32", "discriminator.hidden=[16,8]",
    "discriminator.maxout_pieces=2", "train.batch_size=8", "train.steps=2", "data.num_workers=0",
    "data.shards_per_block=1", "log.every=1", "log.sample_every=1", "log.n_samples=4", "log.wandb=false",
    "log.gif=false", "log.progress_bar=false",
)
# data sets by resolution: Fashion-MNIST (real, 28x28x1) and synthetic RGB shards (the point is shape and plumbing)
RESOLUTIONS = {"fashion": 28, "rgb32": 32, "rgb64": 64, "rgb128": 128}


@dataclass(frozen=True)
class Case:
    id: str
    overrides: tuple[str, ...]
    data: str = "fashion"
    config: Optional[str] = None  # a name in configs/, or None for the schema's defaults

    def load(self, data_path: str = "unused", run_dir: str = "unused") -> Config:
        base = TINY if self.config is None else ()
        return load_config(self.config, [*base, *self.overrides, f"data.path={data_path}", f"run.dir={run_dir}"])


def choice_keys() -> dict[str, tuple]:
    """``section.key`` -> its allowed values, for every key with choices (a registry's names or a ``Literal``'s
    values: distgan.config.key_choices), in every config section."""
    out = {}
    for section, section_type in typing.get_type_hints(Config).items():
        for name in typing.get_type_hints(section_type):
            if section == "eval" and name in ("metrics", "best_metric"):
                continue  # the metric registry's names: tests/test_metric_registry.py and tests/test_eval.py
            if values := key_choices(section, name):
                out[f"{section}.{name}"] = values
    return out


def _loss_case(kind: str, penalty: str) -> Case:
    """Every kind x penalty, with the discriminator norm the validator asks for where the default is refused."""
    fix = ()
    if penalty == "wgan-gp":
        fix = ("discriminator.norm=layer",)
    elif kind == "wasserstein" and penalty == "none":
        fix = ("discriminator.norm=spectral",)
    return Case(f"{kind}-{penalty}", (f"loss.kind={kind}", f"loss.penalty={penalty}", *fix))


MATRIX: list[Case] = [
    *(_loss_case(k, p) for k in key_choices("loss", "kind") for p in key_choices("loss", "penalty")),
    Case("lazy-r1", ("loss.penalty=r1", "loss.penalty_interval=2")),
    Case("dcgan-32-rgb", (), "rgb32"),
    Case("dcgan-64-rgb", ("train.batch_size=4",), "rgb64"),
    Case("dcgan-128-rgb", ("train.batch_size=4",), "rgb128"),
    Case("mlp-batch-layer", ("generator.arch=mlp", "generator.norm=batch", "discriminator.arch=mlp",
                             "discriminator.norm=layer")),
    Case("mlp-32-rgb", ("generator.arch=mlp", "discriminator.arch=mlp", "discriminator.norm=none"), "rgb32"),
    Case("maxout-spectral", ("generator.arch=mlp", "discriminator.arch=maxout", "discriminator.norm=spectral")),
    Case("tf_dcgan", ("generator.arch=tf_dcgan", "discriminator.arch=tf_dcgan", "discriminator.norm=none")),
    Case("tf_dcgan-32-rgb", ("generator.arch=tf_dcgan", "discriminator.arch=tf_dcgan"), "rgb32"),
    Case("sync-batch-r1", ("generator.norm=sync-batch", "discriminator.norm=sync-batch", "loss.penalty=r1")),
    Case("no-norms", ("generator.norm=none", "discriminator.norm=none")),
    Case("upsample-nearest", ("generator.upsample=nearest",)),
    Case("upsample-bilinear-32-rgb", ("generator.upsample=bilinear",), "rgb32"),
    Case("uniform-z-leaky-g", ("generator.z_dist=uniform", "generator.leaky_slope=0.2")),
    Case("d-steps-3", ("train.d_steps=3",)),
    Case("ema-off", ("ema.enabled=false",)),
    Case("ema-fixed-decay", ("ema.decay=0.9",)),  # far enough from 1 that two updates move G_ema visibly
    Case("sgd-momentum", ("g_optim.name=sgd", "g_optim.momentum=0.9", "g_optim.lr=0.01",
                          "d_optim.name=sgd", "d_optim.momentum=0.9", "d_optim.lr=0.01")),
    Case("adamw", ("g_optim.name=adamw", "g_optim.weight_decay=0.01", "d_optim.name=adamw",
                   "d_optim.weight_decay=0.01")),
    # plain SGD makes the clip visible: each G update is at most lr * max_grad_norm long
    Case("max-grad-norm", ("train.max_grad_norm=0.001", "g_optim.name=sgd", "g_optim.lr=0.01",
                           "d_optim.name=sgd", "d_optim.lr=0.01")),
    Case("hflip", ("data.hflip=true",)),
    Case("pad-28-to-32", ("data.pad=2",)),  # the 32x32 DCGAN on 28x28 data; tests/test_pad.py: the crop back
    Case("one-data-worker", ("data.num_workers=1",)),
    Case("on-nonfinite-skip", ("train.on_nonfinite=skip",)),
    # quoted: YAML 1.1 reads a bare `no` as False, which the Literal check refuses (a distgan bug, reported)
    Case("mixed-precision-no", ("train.mixed_precision='no'",)),
    Case("augment-adaptive", ("augment.policy=[translation,cutout,color]", "augment.p=0", "augment.adaptive=true")),
    Case("augment-color-32-rgb", ("augment.policy=[color]",), "rgb32"),
    # one process: global batch 16 = 2 x the reference batch 8, so the lrs are x sqrt(2) and x 2
    Case("batch-per-process-sqrt", ("train.batch_per_process=16", "train.lr_batch_scaling=sqrt")),
    Case("batch-per-process-linear", ("train.batch_per_process=16", "train.lr_batch_scaling=linear")),
]

REFUSED: list[tuple[tuple[str, ...], str]] = [
    (("loss.penalty=wgan-gp",), "loss.penalty=wgan-gp with discriminator.norm=batch: .*discriminator.norm=layer"),
    (("loss.penalty=wgan-gp", "discriminator.norm=sync-batch"), "with discriminator.norm=sync-batch: the penalty"),
    (("loss.kind=wasserstein",), "wasserstein without a Lipschitz constraint diverges: set loss.penalty=wgan-gp"),
    (("loss.kind=wasserstein", "discriminator.norm=layer"), "without a Lipschitz constraint"),
    (("train.lr_batch_scaling=sqrt",), "without train.batch_per_process: .*Set train.batch_per_process=N"),
    (("train.batch_per_process=-1",), "'train.batch_per_process' = -1: must be 0"),
]

# values no in-process CPU case here can train, each covered by the named test (fp16/bf16: as a refusal)
COVERED_ELSEWHERE: dict[tuple[str, str], str] = {
    ("train.mixed_precision", "fp16"): "tests/distributed/test_launch.py::test_mixed_precision_on_cpu_is_a_clear_error",
    ("train.mixed_precision", "bf16"): "tests/distributed/test_launch.py::test_mixed_precision_on_cpu_is_a_clear_error",
    # evaluation needs a feature network (a trained classifier or an Inception file) beside the data
    ("eval.features", "classifier"): "tests/test_eval.py::test_training_evaluates_with_each_feature_network",
    ("eval.features", "inception"): "tests/test_eval.py::test_training_evaluates_with_each_feature_network",
    ("eval.resize", "pytorch-fid"): "tests/test_metrics_reference.py::test_the_pytorch_fid_resize_is_another_convention",
    # a conditioning applies to a class-conditional G only, which needs labeled shards and both conditional keys
    ("generator.conditioning", "norm"): "tests/test_conditional.py::test_conditional_trains_with_losses_penalties_and_archs",
    ("generator.conditioning", "concat"): "tests/test_conditional.py::test_conditional_trains_with_losses_penalties_and_archs",
    # small_bn_batch acts on several processes only (one process: the batch the user chose)
    ("train.small_bn_batch", "error"): "tests/test_gpu_options.py::test_small_bn_batch_error_refuses_and_warn_keeps_plain_batch_norm",
    ("train.small_bn_batch", "warn"): "tests/distributed/test_equivalence.py::test_ranks_identical_and_equal_to_one_process",
    # compiling takes a minute of CPU per mode; the CUDA-graph modes compile as default does on a CPU
    ("train.compile_mode", "reduce-overhead"): "tests/test_compile.py::test_trainer_with_a_cuda_graph_mode_trains_eager_numbers",
    ("train.compile_mode", "max-autotune"): "tests/test_compile.py::test_compile_mode_refusals_are_named",
    ("train.compile_mode", "max-autotune-no-cudagraphs"): "tests/test_compile.py::test_compile_mode_refusals_are_named",
}


# ---------------------------------------------------------------- running a case


@pytest.fixture(scope="module")
def datasets(fashion_shards, tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST shards and 16 random RGB images (2 shards) at each larger resolution."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    out = {"fashion": fashion_shards}
    for name, res in RESOLUTIONS.items():
        if name == "fashion":
            continue
        images = rng.integers(0, 256, (16, res, res, 3), dtype=np.uint8)
        write_shards(images, rng.integers(0, 3, 16), root / name, classes=list("abc"), shard_size=8, progress=False)
        out[name] = root / name
    return out


@pytest.fixture
def fast(monkeypatch) -> Iterator[None]:
    """One intra-op thread and no end-of-run plots: with 2 threads on a busy 2-core machine a tiny batch norm
    took 60 ms instead of 0.2 ms, and matplotlib costs more than two steps (tests/test_configs.py's CLI test
    and tests/test_eval.py draw the plots)."""
    monkeypatch.setattr("distgan.build.set_cpu_threads", lambda *args: torch.get_num_threads())
    monkeypatch.setattr("distgan.plots.plot_run", lambda run_dir: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# each kind's (D loss, G loss) at constant logits: D's first logits are small and close together, so the first
# step's losses sit near these (within Jensen's gap, under 0.1 in this matrix) and the kinds lie 0.5 or more apart
AT_MEAN_LOGITS = {
    "minimax": (lambda r, f: softplus(-r) + softplus(f), lambda f: -softplus(f)),
    "non-saturating": (lambda r, f: softplus(-r) + softplus(f), lambda f: softplus(-f)),
    "hinge": (lambda r, f: 2 - r + f, lambda f: -f),
    "wasserstein": (lambda r, f: f - r, lambda f: -f),
    "least-squares": (lambda r, f: 0.5 * (r - 1) ** 2 + 0.5 * f ** 2, lambda f: 0.5 * (f - 1) ** 2),
}


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
NORM_LAYERS = {"batch": (nn.BatchNorm1d, nn.BatchNorm2d), "sync-batch": (SyncBatchNorm,),
               "layer": (nn.LayerNorm, nn.GroupNorm)}


def norms_in(model: nn.Module) -> set[str]:
    """The norm kinds a built model contains, named as in the config."""
    found = {kind for kind, types in NORM_LAYERS.items() if any(isinstance(m, types) for m in model.modules())}
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        found.add("spectral")
    return found or {"none"}


def parameters(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: p.detach().clone() for k, p in model.named_parameters()}
            for name, model in (("G", trainer.G_plain), ("D", trainer.D_plain))}


class Recorder:
    """What a run did, watched through hooks only: D's inputs during its first phase (real, fake, interpolates),
    the gradients each optimizer first stepped on, how often each stepped, and G before each EMA update."""

    def __init__(self, trainer: Trainer) -> None:
        self.d_start = copy.deepcopy(trainer.D_plain)
        self.d_inputs: list[tuple] = []
        self.first_grads: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = {"d": 0, "g": 0}
        self.trajectory: list[tuple[float, dict[str, torch.Tensor]]] = []  # (beta, G's parameters) per EMA update
        self.g_start = copy.deepcopy(trainer.G_plain)
        self.g_inputs: Optional[tuple] = None  # G's inputs (z, labels) in its first phase
        self.d_at_g: Optional[nn.Module] = None  # D as the first G phase sees it
        self.d_steps = trainer.cfg.train.d_steps
        trainer.D_plain.register_forward_pre_hook(self._d_input)
        trainer.G_plain.register_forward_pre_hook(self._g_input)
        for name, model, opt in (("d", trainer.D_plain, trainer.opt_d), ("g", trainer.G_plain, trainer.opt_g)):
            names = {id(p): k for k, p in model.named_parameters()}
            opt.optimizer.register_step_pre_hook(
                lambda o, *_, name=name, names=names: self._first_grads(name, o, names))
            opt.optimizer.register_step_post_hook(lambda *_, name=name, D=trainer.D_plain: self._stepped(name, D))
        if trainer.ema is not None:
            update = trainer.ema.update

            def recorded(model, *args):
                params = {k: p.detach().clone() for k, p in model.named_parameters()}
                beta = update(model, *args)
                self.trajectory.append((beta, params))
                return beta

            trainer.ema.update = recorded

    def _stepped(self, name: str, D: nn.Module) -> None:
        self.steps[name] += 1
        if name == "d" and self.steps["d"] == self.d_steps:  # before the G phase's forward (spectral norm's u)
            self.d_at_g = copy.deepcopy(D)

    def _g_input(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and self.g_inputs is None:  # the G phase (D phases make fakes without grad)
            self.g_inputs = tuple(a.detach().clone() for a in args)

    def _d_input(self, module: nn.Module, args: tuple) -> None:
        if self.steps["d"] == 0:
            self.d_inputs.append(tuple(a.detach().clone() for a in args))

    def _first_grads(self, name: str, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> None:
        if name not in self.first_grads:
            self.first_grads[name] = {names[id(p)]: p.grad.detach().clone() for group in optimizer.param_groups
                                      for p in group["params"] if p.grad is not None}


def train_watched(cfg: Config, resume: Optional[str] = None) -> tuple[Trainer, dict[str, dict[str, torch.Tensor]],
                                                                     Recorder]:
    """Fit a Trainer for ``cfg``; returns it with G's and D's parameters from before the first step and what the
    run was seen doing."""
    trainer = Trainer(cfg, resume=resume)
    before = parameters(trainer)
    recorder = Recorder(trainer)
    trainer.fit()
    return trainer, before, recorder


def train(cfg: Config, resume: Optional[str] = None) -> tuple[Trainer, dict[str, dict[str, torch.Tensor]]]:
    """Fit a Trainer for ``cfg``; returns it with G's and D's parameters from before the first step."""
    trainer, before, _ = train_watched(cfg, resume)
    return trainer, before


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(trainer: Trainer, before: dict[str, dict[str, torch.Tensor]], first_step: int = 0) -> None:
    """What every trained case must show, and what its options imply, from the files the run wrote."""
    cfg, run, st = trainer.cfg, trainer.run_dir, trainer.state
    t, loss = cfg.train, cfg.loss
    # one process: the global batch is train.batch_per_process when set, and the lrs follow train.lr_batch_scaling
    global_batch = t.batch_per_process or t.batch_size
    lr_factor = (global_batch / t.batch_size) ** {"none": 0, "sqrt": 0.5, "linear": 1}[t.lr_batch_scaling]
    assert st.step == t.steps and st.batches_consumed == t.steps * t.d_steps and st.skipped_steps == 0
    # the options reached the models, the optimisers and the latents
    assert norms_in(trainer.G_plain) == {cfg.generator.norm} and norms_in(trainer.D_plain) == {cfg.discriminator.norm}
    assert any(isinstance(m, nn.Dropout) for m in trainer.D_plain.modules()) == (cfg.discriminator.dropout > 0)
    for opt, o in ((trainer.opt_g, cfg.g_optim), (trainer.opt_d, cfg.d_optim)):
        assert type(opt.optimizer) is OPTIMIZERS[o.name]
        group = opt.param_groups[0]
        assert group["lr"] == pytest.approx(o.lr * lr_factor, rel=1e-12)
        assert (group["weight_decay"], group.get("momentum", 0.0)) == (o.weight_decay, o.momentum)
    assert bool(trainer.fixed_z.abs().max() <= 1) == (cfg.generator.z_dist == "uniform")
    lines = [line for line in metrics(run) if line["step"] > first_step]
    assert [line["step"] for line in lines] == list(range(first_step + 1, t.steps + 1))  # log.every=1
    for line in lines:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"):
            assert math.isfinite(line[key]), (key, line)
        d_indices = range((line["step"] - 1) * t.d_steps, line["step"] * t.d_steps)
        penalized = loss.penalty != "none" and any(i % loss.penalty_interval == 0 for i in d_indices)
        assert ("penalty" in line) == penalized and (not penalized or math.isfinite(line["penalty"])), line
        assert ("ema_beta" in line) == cfg.ema.enabled, line
        if cfg.ema.decay is not None:
            assert line["ema_beta"] == cfg.ema.decay
    assert lines[-1]["images_seen"] == t.steps * global_batch * t.d_steps
    assert all(line["lr_g"] == pytest.approx(cfg.g_optim.lr * lr_factor, rel=1e-12) for line in lines)
    if first_step == 0:  # the configured loss is the one trained
        d_loss, g_loss = AT_MEAN_LOGITS[loss.kind]
        first = lines[0]
        assert abs(first["loss_d"] - d_loss(first["d_real"], first["d_fake"])) < 0.15, (loss.kind, first)
        assert abs(first["loss_g"] - g_loss(first["d_fake"])) < 0.15, (loss.kind, first)

    ckpt = run / "checkpoints" / f"step-{t.steps:08d}"
    for name, start in before.items():
        saved = load_file(str(ckpt / f"{name}.safetensors"))
        assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
        # every weight matrix and kernel; a bias may rightly stay (hinge and Wasserstein D biases get -1 + 1 = 0)
        frozen = [k for k, v in start.items() if v.dim() > 1 and torch.equal(saved[k], v)]
        assert not frozen, f"{name} weights did not move in {t.steps} steps: {frozen}"
    sampled = "G_ema" if cfg.ema.enabled else "G"
    assert (ckpt / "G_ema.safetensors").is_file() == cfg.ema.enabled, "the checkpoint holds G_ema iff ema.enabled"
    export = load_file(str(run / "generator_ema.safetensors"))
    reference = load_file(str(ckpt / f"{sampled}.safetensors"))
    assert_same_tensors(export, reference, f"the exported generator and the checkpoint's {sampled}")
    meta = json.loads((run / "generator_ema.json").read_text())
    source = trainer.source
    assert (meta["ema"], meta["resolution"], meta["channels"], meta["pad"]) == (
        cfg.ema.enabled, source.resolution + 2 * cfg.data.pad, source.channels, cfg.data.pad)
    grids = {p.name for p in (run / "samples").glob("*.png")}
    prefixes = ("g", "g_ema") if cfg.ema.enabled else ("g",)
    assert grids == {f"{p}-step-{s:08d}.png" for p in prefixes for s in range(1, t.steps + 1)}

    if t.max_grad_norm > 0 and cfg.g_optim.name == "sgd" and cfg.g_optim.momentum == 0:
        assert min(line["grad_norm_g"] for line in lines) > t.max_grad_norm, "the clip had nothing to do"
        moved = torch.cat([(before["G"][k] - trainer.G_plain.get_parameter(k).detach()).flatten()
                           for k in before["G"]]).norm()
        assert moved <= (t.steps - first_step) * cfg.g_optim.lr * t.max_grad_norm * (1 + 1e-3), "G steps not clipped"


def check_effects(trainer: Trainer, before: dict[str, dict[str, torch.Tensor]], rec: Recorder) -> None:
    """What each option changed, from the hooks' record of a run started from scratch."""
    cfg, t, g = trainer.cfg, trainer.cfg.train, trainer.cfg.generator
    assert rec.steps == {"d": t.steps * t.d_steps, "g": t.steps}, "optimizer steps per train.d_steps"
    size = trainer.source.resolution + 2 * cfg.data.pad
    assert {tuple(x[0].shape[-2:]) for x in rec.d_inputs} == {(size, size)}, "D sees data.pad's padded images"
    if cfg.data.pad:
        real = rec.d_inputs[0][0]
        pad = cfg.data.pad
        assert torch.all(real[..., :pad, :] == BACKGROUND) and torch.all(real[..., -pad:] == BACKGROUND), \
            "data.pad's border is not the background"
    if g.arch != "tf_dcgan":  # tf_dcgan keeps Keras' LeakyReLU whatever the slope (distgan/nn/tf_dcgan.py)
        slopes = {m.negative_slope for m in trainer.G_plain.modules() if isinstance(m, nn.LeakyReLU)}
        assert slopes == ({g.leaky_slope} if g.leaky_slope > 0 else set()), "generator.leaky_slope"
    if g.arch == "dcgan":
        modes = {m.mode for m in trainer.G_plain.modules() if isinstance(m, nn.Upsample)}
        assert modes == (set() if g.upsample == "transposed" else {g.upsample}), "generator.upsample"
    if cfg.ema.enabled:  # G_ema = the EMA of G's trajectory with the betas used, from G's initial weights
        ema = {k: v.double() for k, v in before["G"].items()}
        for beta, params in rec.trajectory:
            ema = {k: beta * v + (1 - beta) * params[k].double() for k, v in ema.items()}
        saved = load_file(str(trainer.run_dir / "checkpoints" / f"step-{t.steps:08d}" / "G_ema.safetensors"))
        moved = 0.0
        for k, v in ema.items():  # float32 lerps of numbers up to size m: each rounds by at most ~2 x 6e-8 m
            m = max(t.abs().max().item() for t in (v, before["G"][k], *(params[k] for _, params in rec.trajectory)))
            bound = 1.5e-7 * m * len(rec.trajectory)
            assert (saved[k].double() - v).abs().max() <= bound, f"G_ema {k} is not the EMA of G's trajectory"
            moved = max(moved, (v - before["G"][k].double()).abs().max().item() / bound)
        assert len(rec.trajectory) == t.steps and moved > 10, "G_ema's expected move must be visible above rounding"
    check_first_d_gradient(trainer, rec)
    check_first_g_gradient(trainer, rec)


def check_first_g_gradient(trainer: Trainer, rec: Recorder) -> None:
    """G's first gradient is grad(G loss of loss.kind) through D as the G phase saw it, computed again from G's
    initial weights and its latents (and labels); the float32 bound of :func:`check_first_d_gradient`."""
    cfg = trainer.cfg
    if cfg.augment.policy or cfg.discriminator.dropout or cfg.train.max_grad_norm:
        return
    G, D = copy.deepcopy(rec.g_start), copy.deepcopy(rec.d_at_g)
    D.requires_grad_(False)  # as the G phase holds it: frozen (spectral norm then does not iterate)
    z, labels = rec.g_inputs[0], rec.g_inputs[1:]
    logits = D(G(z, *labels), *labels)
    expected = ref.flat(ref.parameter_gradients(ref.G_LOSS[cfg.loss.kind](logits), G))
    recorded = ref.flat({k: rec.first_grads["g"].get(k, torch.zeros_like(p)) for k, p in G.named_parameters()})
    error = (recorded - expected).abs().max()
    assert error <= 1e-4 * expected.abs().max(), f"G's first gradient is not the {cfg.loss.kind} one: {error:.3g} off"


def check_first_d_gradient(trainer: Trainer, rec: Recorder) -> None:
    """D's first gradient is grad(adversarial loss of loss.kind + weight x factor x interval x penalty), computed
    again from D's initial weights and the batches D was given (tests/objective_reference.py).

    float32: both sides sum at most ~10^3 products of each gradient's terms, so they agree to 1e-4 of the larger
    term's size (10^3 x 6e-8, a worst-case bound); the penalty's share must be 100x that bound to be seen.
    Skipped where the gradient is not that formula's: augmentation (random), dropout, clipping."""
    cfg, loss = trainer.cfg, trainer.cfg.loss
    if cfg.augment.policy or cfg.discriminator.dropout or cfg.train.max_grad_norm or cfg.discriminator.conditional:
        return
    first, batch = rec.d_inputs[0][0], trainer.local_batch
    joint = first.shape[0] == 2 * batch  # one D forward on real and fake together (a D without batch statistics)
    if joint:
        (real, fake), later = first.split(batch), rec.d_inputs[1:]
    else:
        real, fake, later = first, rec.d_inputs[1][0], rec.d_inputs[2:]
    D0 = copy.deepcopy(rec.d_start)  # a fresh copy per use: a forward moves spectral norm's power iteration
    g_adv = ref.parameter_gradients(ref.adversarial(loss.kind, D0, real, fake, joint=joint), D0)
    recorded = rec.first_grads["d"]
    recorded = {k: recorded.get(k, torch.zeros_like(v)) for k, v in g_adv.items()}
    scale = ref.flat(g_adv).abs().max()
    expected = ref.flat(g_adv)
    if loss.penalty != "none":  # D's first phase is a regularization step at any interval
        x_hat = later[0][0] if loss.penalty == "wgan-gp" else None
        D0 = copy.deepcopy(rec.d_start)
        weighted = ref.flat(ref.parameter_gradients(ref.penalty(loss.penalty, D0, real, fake, x_hat), D0))
        weighted = weighted * loss.penalty_weight * ref.FACTOR[loss.penalty] * loss.penalty_interval
        scale = scale + weighted.abs().max()
        assert weighted.abs().max() > 1e-2 * scale, "the penalty's share of D's gradient is too small to be seen"
        expected = expected + weighted
    error = (ref.flat(recorded) - expected).abs().max()
    assert error <= 1e-4 * scale, f"D's first gradient is not the {loss.kind} + {loss.penalty} one: {error:.3g} off"


# ---------------------------------------------------------------- the matrix


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_option_trains(case: Case, datasets, tmp_path, fast):
    trainer, before, recorder = train_watched(case.load(str(datasets[case.data]), str(tmp_path / "run")))
    check_run(trainer, before)
    check_effects(trainer, before, recorder)


@pytest.mark.parametrize("overrides, message", REFUSED, ids=["+".join(o) for o, _ in REFUSED])
def test_refused_combination_names_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


@pytest.mark.timeout(180)
def test_dropout_run_resumes_where_it_stopped(datasets, tmp_path, fast):
    """2 steps, then ``--resume auto`` to 4: the counter continues and the weights equal 4 straight steps
    (dropout masks are drawn from (seed, step, rank), so resuming needs no RNG state)."""
    def load(run: Path, steps: int) -> Config:
        return load_config(None, [*TINY, "discriminator.dropout=0.3", f"train.steps={steps}", "checkpoint.every=1000",
                                  f"data.path={datasets['fashion']}", f"run.dir={run}"])

    first, before, recorder = train_watched(load(tmp_path / "split", 2), resume="auto")
    check_run(first, before)
    check_effects(first, before, recorder)
    second = Trainer(load(tmp_path / "split", 4), resume="auto")
    assert second.resumed_from.name == "step-00000002" and second.state.step == 2
    before = parameters(second)
    second.fit()
    check_run(second, before, first_step=2)
    assert [line["step"] for line in metrics(tmp_path / "split")] == [1, 2, 3, 4]
    train(load(tmp_path / "straight", 4))
    for name in ("D", "G", "G_ema"):
        straight, split = (tmp_path / run / "checkpoints" / "step-00000004" / f"{name}.safetensors"
                           for run in ("straight", "split"))
        assert_same_tensors(load_file(str(straight)), load_file(str(split)),
                            f"{name} after 4 straight steps and after 2 + resume + 2")


# ---------------------------------------------------------------- coverage of the schema


def trained_configs() -> list[Config]:
    """The resolved config of every case trained in this file and in tests/test_configs.py."""
    from test_configs import CONFIG_CASES  # here, not at the top: test_configs imports this module

    return [case.load() for case in [*MATRIX, *CONFIG_CASES]]


def as_list(value: object) -> list:
    """A list-of-choices key (augment.policy) trains each value it holds."""
    return value if isinstance(value, list) else [value]


def test_every_choice_value_is_trained():
    keys = choice_keys()
    seen = {(key, value) for cfg in trained_configs() for key in keys
            for value in as_list(getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))}
    missing = [f"{key}={value}" for key, values in keys.items() for value in values
               if (key, value) not in seen and (key, value) not in COVERED_ELSEWHERE]
    assert not missing, f"choices no test trains: {missing}; add a case to MATRIX or a named test to COVERED_ELSEWHERE"
    for (key, value), test in COVERED_ELSEWHERE.items():
        assert value in keys[key], f"COVERED_ELSEWHERE names {key}={value}, which the schema no longer has"
        path, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{test} does not exist"


def test_dcgan_is_trained_at_every_resolution_it_supports():
    trained = {RESOLUTIONS[c.data] + 2 * cfg.data.pad for c in MATRIX
               if (cfg := c.load()).generator.arch == cfg.discriminator.arch == "dcgan"}
    assert trained == set(BASE_SIZE)


def test_choice_keys_are_found():
    """The walk over the schema sees the choice keys (so an empty walk cannot pass the coverage test)."""
    keys = choice_keys()
    assert keys["loss.penalty"] == ("none", "wgan-gp", "r1", "r2") and keys["d_optim.name"] == ("adam", "adamw", "sgd")
    assert len(keys) >= 10
