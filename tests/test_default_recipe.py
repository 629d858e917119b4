"""The default recipe, configs/fashion_mnist.yaml, trains briefly through ``python -m distgan.train`` as shipped.

Only the run dir, the data path, the step count and logging are overridden (20 full-width steps on 1,000 real
Fashion-MNIST images): the resolved config in the run dir is the file's, the losses are finite, the export loads.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import run_cli
from distgan.config import CONFIG_DIR, load_config
from distgan.export import load_generator_export
from distgan.rundir import flatten as file_values  # section.key -> value of a YAML file's keys
from test_configs import flatten

STEPS = 20
LOG = ("log.wandb=false", "log.progress_bar=false", "log.every=5", "log.sample_every=10")


@pytest.mark.timeout(120)
def test_default_recipe_trains_through_the_cli(fashion_shards, tmp_path):
    run = tmp_path / "run"
    overrides = (f"run.dir={run}", f"data.path={fashion_shards}", f"train.steps={STEPS}", *LOG)
    run_cli("distgan.train", "--config", "fashion_mnist", *overrides)

    resolved = flatten(load_config(str(run / "config.yaml")))
    changed = {key for key, value in flatten(load_config("fashion_mnist")).items() if resolved[key] != value}
    assert changed <= {o.split("=")[0] for o in overrides}, "the resolved config is not the shipped recipe"
    written = file_values(yaml.safe_load((CONFIG_DIR / "fashion_mnist.yaml").read_text()))
    kept = {key: value for key, value in written.items() if key not in changed}
    assert kept and all(resolved[key] == value for key, value in kept.items())

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert all(math.isfinite(line[k]) for line in lines for k in ("loss_d", "loss_g", "d_real", "d_fake"))

    generator, meta = load_generator_export(run / "generator_ema.safetensors")
    assert (meta["step"], meta["resolution"], meta["channels"]) == (STEPS, 28, 1)
    with torch.no_grad():
        images = generator(torch.randn(8, generator.z_dim))
    assert images.shape == (8, 1, 28, 28) and images.isfinite().all() and images.abs().max() <= 1
