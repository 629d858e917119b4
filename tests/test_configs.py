"""Every shipped config trains (shrunk to two steps on tiny widths), and the README's quick start runs as written.

Each config in configs/ runs through the real Trainer on the data it is meant for: Fashion-MNIST shards; MNIST
shards made by ``distgan.prepare mnist`` (from the Fashion-MNIST IDX files, which have MNIST's names and format);
CIFAR-10 shards made by ``distgan.prepare cifar10`` from an archive in the real CIFAR-10 python format built
here. Only sizes, steps and logging are overridden: the recipe (architecture, norms, loss, optimisers, EMA)
is the shipped one, and that is asserted too.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from conftest import FASHION_DIR, REPO, require_fashion_mnist, run_cli
from distgan import prepare
from distgan.config import CONFIG_DIR, load_config
from test_data import make_cifar
from test_every_option import Case, check_run, fast, train  # noqa: F401 (fast is a fixture)

SHRINK = (
    "train.steps=2", "train.batch_size=8", "data.num_workers=0", "data.shards_per_block=1", "log.every=1",
    "log.sample_every=1", "log.n_samples=4", "log.wandb=false", "log.gif=false", "log.progress_bar=false",
)
CONFIG_CASES: list[Case] = [
    Case("fashion_mnist", (*SHRINK, "generator.width=8", "discriminator.width=8"), "fashion", "fashion_mnist"),
    Case("fashion_mnist_baseline", (*SHRINK, "generator.width=8", "discriminator.width=8"), "fashion",
         "fashion_mnist_baseline"),
    Case("fashion_mnist_cond", (*SHRINK, "generator.width=8", "discriminator.width=8", "eval.metrics=[]"), "fashion",
         "fashion_mnist_cond"),
    Case("mnist", (*SHRINK, "generator.width=8", "discriminator.width=8"), "mnist", "mnist"),
    Case("cifar10", (*SHRINK, "generator.width=8", "discriminator.width=8"), "cifar10", "cifar10"),
    Case("cifar10_8gpu", (*SHRINK, "generator.width=8", "discriminator.width=8", "train.batch_per_process=4"),
         "cifar10", "cifar10_8gpu"),
    Case("cifar10_long", (*SHRINK, "generator.width=8", "discriminator.width=8", "eval.metrics=[]"), "cifar10",
         "cifar10_long"),
    Case("smoke", SHRINK, "fashion", "smoke"),
    Case("seed_dcgan", (*SHRINK, "generator.width=4", "discriminator.width=4"), "fashion", "seed_dcgan"),
    Case("seed_mlp_gan", (*SHRINK, "generator.hidden=[16,32]", "discriminator.hidden=[32,16]"), "fashion",
         "seed_mlp_gan"),
]


@pytest.fixture(scope="module")
def config_data(fashion_shards, tmp_path_factory) -> dict[str, Path]:
    """Fashion-MNIST shards, 200 'MNIST' images and a 20-image CIFAR-10 archive, each through distgan.prepare."""
    root = tmp_path_factory.mktemp("config_data")
    assert prepare.main(["mnist", "--src", str(FASHION_DIR), "--out", str(root / "mnist"), "--limit", "200",
                         "--no-progress"]) == 0
    archive, _ = make_cifar(root / "raw", per_batch=4)
    assert prepare.main(["cifar10", "--src", str(archive), "--out", str(root / "cifar10"), "--no-progress"]) == 0
    return {"fashion": fashion_shards, "mnist": root / "mnist", "cifar10": root / "cifar10"}


def flatten(cfg) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in dataclasses.asdict(cfg).items()
            for key, value in values.items()}


def test_every_shipped_config_has_a_case():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(c.config for c in CONFIG_CASES)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CONFIG_CASES, ids=lambda c: c.id)
def test_shipped_config_trains(case: Case, config_data, tmp_path, fast):
    cfg = case.load(str(config_data[case.data]), str(tmp_path / "run"))
    shipped, ours = flatten(load_config(case.config)), flatten(cfg)
    changed = {key for key in shipped if shipped[key] != ours[key]}
    assert changed <= {o.split("=")[0] for o in case.overrides} | {"data.path", "run.dir"}, "the recipe was changed"
    trainer, before = train(cfg)
    check_run(trainer, before)


@pytest.mark.timeout(300)
def test_readme_quick_start_through_the_cli(tmp_path):
    """The README's first command (data and training), shrunk to 500 images and 3 steps, in a fresh process."""
    require_fashion_mnist()
    readme = (REPO / "README.md").read_text()
    assert "python3 -m distgan.prepare fashion-mnist --out data/fashion_mnist --force && " \
           "python3 -m distgan.train --config fashion_mnist --resume auto" in readme
    data, run = tmp_path / "fashion_mnist", tmp_path / "run"
    run_cli("distgan.prepare", "fashion-mnist", "--out", str(data), "--force", "--limit", "500")
    run_cli("distgan.train", "--config", "fashion_mnist", "--resume", "auto", f"data.path={data}", f"run.dir={run}",
            "train.steps=3", "generator.width=8", "discriminator.width=8", "log.every=1", "log.sample_every=2",
            "checkpoint.every=2")

    assert load_config(str(run / "config.yaml")).discriminator.norm == "spectral"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(math.isfinite(line[k]) for line in lines for k in ("loss_d", "loss_g", "d_real", "d_fake"))
    assert {p.name for p in (run / "samples").glob("*.png")} == {
        f"{m}-step-{s:08d}.png" for m in ("g", "g_ema") for s in (2, 3)}
    assert Image.open(run / "progress.gif").n_frames == 2
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-00000002", "step-00000003"]
    assert (run / "generator_ema.safetensors").is_file()
    assert json.loads((run / "generator_ema.json").read_text())["step"] == 3
    assert list((run / "plots").glob("*.png"))
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), "the default wandb logging ran offline"
