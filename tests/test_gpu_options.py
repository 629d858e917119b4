"""The GPU-oriented options, as far as CPU can check them: channels_last trains the same math, torch.compile trains
the same math and is refused with a gradient penalty, and plain batch norm on a small per-rank batch is warned
about."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from distgan.config import ConfigError, DataConfig, load_config
from distgan.data.stream import make_batch_iterator, normalize_images
from distgan.build import norms_for_ranks
from distgan.distributed import batch_plan
from distgan.trainer import Trainer
from tests.distributed.support import MemorySource
from tests.test_data_pipeline import make_dataset, take


def test_compile_with_a_penalty_is_refused():
    with pytest.raises(ConfigError, match=r"train.compile=true with loss.penalty=r1: .*Set train.compile=false"):
        load_config("smoke", ["train.compile=true", "loss.penalty=r1"])
    assert load_config("smoke", ["train.compile=true"]).train.compile


@pytest.mark.parametrize("norms,batch,world,switched", [
    (("batch", "batch"), 128, 8, ("sync-batch", "sync-batch")),  # 16 per rank: both switched
    (("batch", "spectral"), 64, 8, ("sync-batch", "spectral")),  # cifar10.yaml on 8 GPUs: G's 8 per rank
    (("sync-batch", "none"), 128, 8, None),  # synchronized already
    (("batch", "batch"), 16, 1, None),  # one process: the batch the user chose
    (("batch", "none"), 128, 2, None),  # 64 per rank
    (("batch", "none"), 64, 2, None),  # exactly 32 per rank
])
def test_plain_bn_on_a_small_per_rank_batch_becomes_sync_batch(caplog, norms, batch, world, switched):
    cfg = load_config("cifar10", [f"generator.norm={norms[0]}", f"discriminator.norm={norms[1]}",
                                  f"train.batch_size={batch}"])
    with caplog.at_level(logging.INFO, logger="distgan.build"):
        g, d = norms_for_ranks(cfg, batch_plan(cfg.train, world), world)
    assert (g.norm, d.norm) == (switched or norms)
    only_norms = (dataclasses.replace(g, norm=cfg.generator.norm), dataclasses.replace(d, norm=cfg.discriminator.norm))
    assert only_norms == (cfg.generator, cfg.discriminator)  # nothing but the norm changes
    assert ("sync-batch instead for this run" in caplog.text) == (switched is not None)
    if switched:
        assert f"per-rank batch of {batch // world} (global batch {batch} over {world} processes)" in caplog.text
        assert "train.small_bn_batch=warn" in caplog.text


def test_small_bn_batch_error_refuses_and_warn_keeps_plain_batch_norm(caplog):
    cfg = load_config("cifar10", ["train.small_bn_batch=error"])  # G: plain BN; 64 over 8 processes
    with pytest.raises(ConfigError, match=r"generator.norm=batch on a per-rank batch of 8 .* at least 256, .*"
                                          r"train.batch_per_process=32"):
        norms_for_ranks(cfg, batch_plan(cfg.train, 8), 8)
    cfg = load_config("cifar10", ["train.small_bn_batch=warn"])
    with caplog.at_level(logging.INFO, logger="distgan.build"):
        g, _ = norms_for_ranks(cfg, batch_plan(cfg.train, 8), 8)
        norms_for_ranks(cfg, batch_plan(cfg.train, 8), 8, announce=False)  # the other ranks: silent
    assert g.norm == "batch" and caplog.text.count("kept as plain batch norm") == 1


def first_losses(tmp_path, *overrides: str) -> tuple[Trainer, dict]:
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "train.steps=2", "log.every=1", "log.sample_every=1000",
                                "log.gif=false", "train.cpu_threads=1", *overrides])
    trainer = Trainer(cfg, source=MemorySource())
    trainer.fit()
    return trainer, json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.timeout(120)
def test_channels_last_trains_the_same_math(tmp_path):
    trainer, nhwc = first_losses(tmp_path / "nhwc", "train.channels_last=true")
    conv = next(m for m in trainer.D_plain.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.stride()[1] == 1
    _, nchw = first_losses(tmp_path / "nchw")
    # step 0's figures come from the initial weights: equal up to float32 rounding of a few conv layers (the
    # logit means d_real/d_fake are near 0: an absolute bound, from logits of size ~1 and ~1e-7 per operation)
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert nhwc[key] == pytest.approx(nchw[key], rel=1e-5, abs=1e-5), key


def test_raw_uint8_batches_normalise_to_the_float_stream_bit_for_bit(tmp_path):
    """On a GPU the stream hands over uint8 (a quarter of the bytes, pinned) and the trainer normalises on the
    device: the same numbers as the float32 stream."""
    cfg = DataConfig(path=str(make_dataset(tmp_path / "ds", n=60, shard_size=20)), num_workers=0, hflip=True)
    floats = take(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=4), 9)
    raw = take(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=4, raw=True), 9)
    assert all(r.dtype == torch.uint8 for r, _ in raw)
    assert all(torch.equal(normalize_images(r), f) and torch.equal(rl, fl) for (r, rl), (f, fl) in zip(raw, floats))


def trained(run_dir, *overrides: str) -> tuple[Trainer, list[dict], dict[str, torch.Tensor]]:
    """3 steps of the smoke config on in-memory batches: the Trainer, every metrics.jsonl line, and G's and D's
    parameters before the first step."""
    cfg = load_config("smoke", [f"run.dir={run_dir}", "train.steps=3", "log.every=1", "log.sample_every=1000",
                                "log.gif=false", "train.cpu_threads=1", *overrides])
    trainer = Trainer(cfg, source=MemorySource())
    before = {f"{net}.{k}": p.detach().clone() for net, model in (("G", trainer.G_plain), ("D", trainer.D_plain))
              for k, p in model.named_parameters()}
    trainer.fit()
    return trainer, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], before


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{net}.{k}": p.detach() for net, model in (("G", trainer.G_plain), ("D", trainer.D_plain))
            for k, p in model.named_parameters()}


@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU (inductor) needs a C++ compiler; none on PATH")
def test_compile_trains_the_same_math(tmp_path, monkeypatch):
    monkeypatch.setattr("distgan.plots.plot_run", lambda run_dir: None)
    torch._dynamo.reset()
    try:
        compiled, c_lines, start = trained(tmp_path / "compiled", "train.compile=true")
    finally:
        torch._dynamo.reset()
    assert compiled.G_plain._compiled_call_impl is not None and compiled.D_plain._compiled_call_impl is not None
    eager, e_lines, e_start = trained(tmp_path / "eager")
    assert all(torch.equal(start[k], e_start[k]) for k in start)  # the same initial weights
    # Step 1's figures come from the same initial weights and inputs: inductor's fused kernels only round (and
    # reorder sums) differently, ~1e-7 relative per float32 op over a few dozen ops, so 1e-5 (absolute for the
    # logit means near 0, whose terms are of size ~1) bounds it with margin, as for channels_last above.
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert c_lines[0][key] == pytest.approx(e_lines[0][key], rel=1e-5, abs=1e-5), key
    # After 3 Adam steps: Adam's step is ~lr per weight whatever the gradient's size, so a rounding-level gradient
    # difference moves a weight differently only where its gradient is near 0 (and through it the later steps);
    # the compiled weights must sit within 10% of the distance training moved them from the eager ones.
    c_params, e_params = parameters(compiled), parameters(eager)
    for key in sorted(start):
        moved = (e_params[key] - start[key]).norm()
        assert torch.isfinite(c_params[key]).all()
        assert (c_params[key] - e_params[key]).norm() <= 0.1 * moved + 1e-7, key
