"""The CIFAR-10 flagship recipe (configs/cifar10.yaml, cifar10_long.yaml) trains at 32x32x3 through the real CLI.

A small archive in the real CIFAR-10 python format is written here and prepared by ``distgan.prepare``; only
sizes, steps, logging and evaluation sizes are overridden, and the test asserts the recipe itself (hinge loss,
spectral-norm D, Adam 2e-4 with betas 0.5/0.999, two D steps) came through into the run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from distgan import prepare
from distgan.config import load_config
from distgan.export import load_generator_export
from distgan.metrics.cache import find_classifier
from test_cli_end_message import assert_where_to_look, end_lines
from test_configs import flatten
from test_data import make_cifar

TINY = ("generator.width=8", "discriminator.width=8", "train.steps=4", "train.batch_size=16", "data.num_workers=0",
        "data.shards_per_block=1", "log.every=2", "log.sample_every=2", "log.n_samples=16", "log.wandb=false",
        "log.progress_bar=false", "checkpoint.every=2")
EVAL = ("eval.every=2", "eval.n=32", "eval.batch=16", "eval.classifier_steps=5")


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory) -> Path:
    """200 train and 40 test images in the CIFAR-10 archive format, prepared into DATA and DATA_test."""
    root = tmp_path_factory.mktemp("cifar")
    archive, _ = make_cifar(root / "raw", per_batch=40)
    for split, out in (("train", root / "cifar10"), ("test", root / "cifar10_test")):
        assert prepare.main(["cifar10", "--src", str(archive), "--out", str(out), "--split", split,
                             "--shard-size", "50", "--no-progress"]) == 0
    return root / "cifar10"


def train_cli(config: str, data: Path, run: Path, *extra: str) -> list[str]:
    """Train ``config`` through ``python -m distgan.train``; returns the lines printed from 'done:' on."""
    overrides = (*TINY, *extra, f"data.path={data}", f"run.dir={run}")
    out = run_cli("distgan.train", "--config", config, *overrides).stdout
    resolved, shipped = flatten(load_config(str(run / "config.yaml"))), flatten(load_config(config))
    changed = {key for key in shipped if shipped[key] != resolved[key]}
    assert changed <= {o.split("=")[0] for o in overrides}, "the recipe was changed"
    return end_lines(out)


def assert_recipe(run: Path) -> None:
    """The SN-DCGAN settings in the resolved config, spectral norm in D's weights, finite losses, the export."""
    cfg = load_config(str(run / "config.yaml"))
    assert (cfg.loss.kind, cfg.loss.penalty, cfg.discriminator.norm, cfg.generator.norm) == (
        "hinge", "none", "spectral", "batch")
    for optim in (cfg.g_optim, cfg.d_optim):
        assert (optim.name, optim.lr, optim.betas) == ("adam", 2e-4, [0.5, 0.999])
    assert (cfg.train.d_steps, cfg.data.hflip) == (2, True)
    assert (cfg.generator.z_dim, cfg.discriminator.leaky_slope) == (128, 0.1)

    d_weights = load_file(str(run / "checkpoints" / "step-00000004" / "D.safetensors"))
    matrices = [key for key, value in d_weights.items() if value.dim() >= 2]
    assert matrices and all("parametrizations.weight.original" in key for key in matrices), matrices

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [line for line in lines if "loss_d" in line]
    assert [line["step"] for line in losses] == [2, 4]
    assert all(math.isfinite(line[k]) for line in losses for k in ("loss_d", "loss_g", "d_real", "d_fake"))

    generator, meta = load_generator_export(run / "generator_ema.safetensors")
    assert (meta["resolution"], meta["channels"], len(meta["classes"])) == (32, 3, 10)
    with torch.no_grad():
        assert generator(torch.randn(2, generator.z_dim)).shape == (2, 3, 32, 32)


@pytest.mark.timeout(120)
def test_cifar10_recipe_trains_through_the_cli(cifar_shards, tmp_path):
    run = tmp_path / "run"
    lines = train_cli("cifar10", cifar_shards, run)
    assert_recipe(run)
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-00000002", "step-00000004"]
    assert_where_to_look(lines, run)


@pytest.mark.timeout(120)
def test_cifar10_long_evaluates_with_the_classifier_and_keeps_the_best(cifar_shards, tmp_path):
    """No Inception weights: the classifier is trained on first use (kept in distgan's cache folder), fd and modes covered are
    logged at every evaluation, the best checkpoint follows fd, and the end message gives the final figures."""
    run = tmp_path / "run"
    lines = train_cli("cifar10_long", cifar_shards, run, *EVAL)
    assert_recipe(run)
    assert find_classifier(cifar_shards) is not None and not (cifar_shards / "feature_classifier.safetensors").exists()
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/fd" in line]
    assert [e["step"] for e in evals] == [2, 4] and all(math.isfinite(e["eval/fd"]) for e in evals)
    assert all(0 <= e["eval/modes_covered"] <= 10 for e in evals)
    assert (run / "checkpoints" / "best").is_dir()
    assert_where_to_look(lines, run)
    final = evals[-1]
    assert lines[2] == (f"evaluation at step 4: fd {final['eval/fd']:.4g}, "
                        f"modes covered {final['eval/modes_covered']:.0f} of 10"), lines
