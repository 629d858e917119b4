"""train.batch_per_process and train.lr_batch_scaling: the global batch, each rank's share and the lr factor
(distgan.distributed.batch_plan), on 1 process through the Trainer, and the refused resume across process counts.
tests/distributed/test_launch.py runs them on 2 processes; tests/test_every_option.py trains each choice."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distgan.config import ConfigError, TrainConfig, choices, load_config
from distgan.distributed import LR_EXPONENTS, batch_plan
from distgan.trainer import Trainer
from tests.distributed.support import MemorySource


def test_every_scaling_choice_has_an_exponent():
    assert set(LR_EXPONENTS) == set(choices(TrainConfig, "lr_batch_scaling"))


@pytest.mark.parametrize("processes", [1, 2, 8])
def test_batch_per_process_grows_the_global_batch_and_scales_the_lrs(processes):
    for scaling, exponent in (("none", 0), ("sqrt", 0.5), ("linear", 1)):
        plan = batch_plan(TrainConfig(batch_size=64, batch_per_process=32, lr_batch_scaling=scaling), processes)
        assert (plan.global_batch, plan.local_batch) == (32 * processes, 32)
        assert plan.lr_factor == pytest.approx((processes / 2) ** exponent, rel=1e-12)


@pytest.mark.parametrize("processes", [1, 2, 8])
def test_off_the_global_batch_is_batch_size(processes):
    plan = batch_plan(TrainConfig(batch_size=64), processes)
    assert (plan.global_batch, plan.local_batch, plan.lr_factor) == (64, 64 // processes, 1.0)


def test_a_batch_that_does_not_divide_is_refused_and_batch_per_process_is_the_fix():
    with pytest.raises(ConfigError, match="train.batch_size=15 does not divide over 2 processes.*batch_per_process"):
        batch_plan(TrainConfig(batch_size=15), 2)
    assert batch_plan(TrainConfig(batch_size=15, batch_per_process=15), 2).global_batch == 30


def _cfg(run, *extra: str):
    return load_config("smoke", [f"run.dir={run}", "train.steps=2", "train.batch_size=8", "train.batch_per_process=4",
                                 "train.lr_batch_scaling=sqrt", "log.every=1", "log.sample_every=1000",
                                 "log.gif=false", "ema.enabled=false", *extra])


class Recording(MemorySource):
    """MemorySource that keeps the per-rank batch sizes it was asked for."""

    def __init__(self):
        super().__init__()
        self.asked: list[int] = []

    def batches(self, batch_size, rank, world_size, seed, start_batch):
        self.asked.append(batch_size)
        return super().batches(batch_size, rank, world_size, seed, start_batch)


@pytest.mark.timeout(120)
def test_one_process_trains_the_global_batch_at_the_scaled_lrs(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("distgan.plots.plot_run", lambda run_dir: None)
    cfg = _cfg(tmp_path / "run")
    source = Recording()
    caplog.set_level("INFO", logger="distgan.build")
    trainer = Trainer(cfg, source=source)
    trainer.fit()
    factor = math.sqrt(4 / 8)  # global batch 4 x 1 process, reference batch 8
    assert source.asked == [4] and trainer.fixed_z.shape[0] == cfg.log.n_samples
    assert trainer._latent(0, 0, 0).shape[0] == 4
    for opt, o in ((trainer.opt_g, cfg.g_optim), (trainer.opt_d, cfg.d_optim)):
        assert opt.param_groups[0]["lr"] == pytest.approx(o.lr * factor, rel=1e-12)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["images_seen"] for line in lines] == [4, 8]
    assert "global batch 4 (4 per process x 1), lr_g" in caplog.text


@pytest.mark.timeout(120)
def test_resume_on_another_process_count_is_refused_and_on_the_same_continues(tmp_path, monkeypatch):
    monkeypatch.setattr("distgan.plots.plot_run", lambda run_dir: None)
    run = tmp_path / "run"
    Trainer(_cfg(run), source=MemorySource()).fit()
    state_file = run / "checkpoints" / "step-00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # as if 2 processes had written it
    with pytest.raises(ConfigError, match=r"on 1 processes: it was trained on 2 with train.batch_per_process=4, so "
                                          r"the global batch .* from 8 to 4 mid-run. Resume on 2 processes"):
        Trainer(_cfg(run, "train.steps=3"), source=MemorySource(), resume="auto")
    state_file.write_text(json.dumps(state))
    trainer = Trainer(_cfg(run, "train.steps=3"), source=MemorySource(), resume="auto")
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(trainer.cfg.g_optim.lr * math.sqrt(0.5), rel=1e-12)
    assert trainer.fit().images_seen == 12 and torch.isfinite(next(trainer.G_plain.parameters())).all()
