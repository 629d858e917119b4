"""The real commands end to end on 1,000 real Fashion-MNIST images: files written, finite losses, resume."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from compare import assert_same_files, assert_same_tensors
from conftest import run_cli
from distgan.config import load_config
from distgan.trainer import NonFiniteError, Trainer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_run(fashion_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "smoke"
    run_cli("distgan.train", "--config", "smoke", f"data.path={fashion_shards}", f"run.dir={run}", "log.wandb=true")
    return run


@pytest.mark.timeout(300)
def test_smoke_run_writes_everything(smoke_run):
    cfg = load_config(str(smoke_run / "config.yaml"))
    assert cfg.train.steps == 20 and cfg.run.dir == str(smoke_run)
    lines = [json.loads(l) for l in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20]
    for line in lines:
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "lr_g", "lr_d",
                    "images_per_s", "images_seen", "ema_beta"):
            assert isinstance(line[key], float | int) and math.isfinite(line[key]), (key, line)
    assert lines[-1]["images_seen"] == 20 * 16
    samples = sorted(p.name for p in (smoke_run / "samples").glob("*.png"))
    assert samples == ["g-step-00000010.png", "g-step-00000020.png", "g_ema-step-00000010.png", "g_ema-step-00000020.png"]
    grid = Image.open(smoke_run / "samples" / "g_ema-step-00000020.png")
    assert grid.size == (4 * 30 + 2, 4 * 30 + 2)  # 16 samples of 28 px, 2 px padding
    gif = Image.open(smoke_run / "progress.gif")
    assert gif.n_frames == 2
    assert [p.name for p in sorted((smoke_run / "checkpoints").glob("step-*"))] == ["step-00000010", "step-00000020"]
    meta = json.loads((smoke_run / "generator_ema.json").read_text())
    assert meta["resolution"] == 28 and meta["channels"] == 1 and meta["ema"] is True and len(meta["classes"]) == 10
    weights = load_file(str(smoke_run / "generator_ema.safetensors"))
    ckpt = load_file(str(smoke_run / "checkpoints" / "step-00000020" / "G_ema.safetensors"))
    assert_same_tensors(weights, ckpt, "the exported generator and the last checkpoint's G_ema")
    offline = list((smoke_run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("run-*.wandb"))
    assert len(list(offline[0].glob("files/media/images/samples/*.png"))) == 4, "sample grids reach wandb"


@pytest.mark.timeout(300)
def test_sample_cli(smoke_run, tmp_path):
    run_cli("distgan.sample", "--run", str(smoke_run), "--n", "9", "--out", str(tmp_path / "png"))
    assert len(list((tmp_path / "png").glob("*.png"))) == 9
    assert Image.open(tmp_path / "png" / "000000.png").size == (28, 28)
    run_cli("distgan.sample", "--run", str(smoke_run), "--n", "16", "--grid", "--out", str(tmp_path / "grid"))
    assert Image.open(tmp_path / "grid" / "grid.png").size == (122, 122)
    run_cli("distgan.sample", "--export", str(smoke_run / "generator_ema.safetensors"), "--n", "8",
            "--interpolate", "--out", str(tmp_path / "interp"))
    assert Image.open(tmp_path / "interp" / "interpolation.png").size == (8 * 30 + 2, 32)
    run_cli("distgan.sample", "--run", str(smoke_run), "--n", "40", "--shards", "--out", str(tmp_path / "shards"))
    from distgan.data.shards import read_dataset_info

    info = read_dataset_info(str(tmp_path / "shards"))
    assert info.count == 40 and info.resolution == 28 and info.channels == 1


def _trainer(shards: Path, run: Path, steps: int, **over) -> Trainer:
    overrides = [f"data.path={shards}", f"run.dir={run}", f"train.steps={steps}", "data.num_workers=1",
                 "checkpoint.every=1000"] + [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    return Trainer(load_config("smoke", overrides), resume="auto")


class StopAt(Trainer):
    """Asks itself to stop (as a preemption signal would) once ``stop_at`` steps are done."""

    stop_at = 0

    def stop_requested(self) -> bool:
        if self.state.step == self.stop_at:
            self.stop.file.touch()
        return super().stop_requested()


@pytest.mark.timeout(300)
def test_resume_is_bit_identical(fashion_shards, tmp_path):
    straight = tmp_path / "straight"
    _trainer(fashion_shards, straight, 16).fit()

    # N steps, a stop request (as on preemption), resume, N more steps; a real data worker process throughout
    split = tmp_path / "split"
    cfg = load_config("smoke", [f"data.path={fashion_shards}", f"run.dir={split}", "train.steps=16",
                                "data.num_workers=1", "checkpoint.every=1000", "train.stop_check_every=4"])
    first = StopAt(cfg, resume="auto")
    first.stop_at = 8
    state = first.fit()
    assert state.step == 8 and not (split / "generator_ema.safetensors").exists()
    assert [p.name for p in (split / "checkpoints").glob("step-*")] == ["step-00000008"]
    assert not (split / "STOP").exists()
    second = _trainer(fashion_shards, split, 16)
    assert second.resumed_from.name == "step-00000008" and second.state.batches_consumed == 8
    second.fit()

    # D first: a wrong data position shows there at once; each names the first differing tensor, never a diff
    for name in ("D", "G"):
        assert_same_files(straight / "checkpoints" / "step-00000016" / f"{name}.safetensors",
                          split / "checkpoints" / "step-00000016" / f"{name}.safetensors",
                          f"{name} after 16 straight steps and after 8 + resume + 8")
    assert_same_files(straight / "generator_ema.safetensors", split / "generator_ema.safetensors",
                      "G_ema after 16 straight steps and after 8 + resume + 8")
    steps = [json.loads(l)["step"] for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 16]


class NaNSource:
    """Real-looking batches that turn into NaN from batch ``bad_from`` on."""

    resolution, channels, classes = 28, 1, None

    def __init__(self, bad_from: int):
        self.bad_from = bad_from

    def batches(self, batch_size, rank, world_size, seed, start_batch):
        i = start_batch
        while True:
            x = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(i)) * 2 - 1
            if i >= self.bad_from:
                x[:] = float("nan")
            yield x, torch.full((batch_size,), -1)
            i += 1


@pytest.mark.timeout(120)
def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path):
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "train.steps=20", "checkpoint.every=5"])
    with pytest.raises(NonFiniteError, match=r"step 7: the D loss or gradient is not finite.*step-00000005"):
        Trainer(cfg, source=NaNSource(bad_from=7)).fit()


@pytest.mark.timeout(120)
def test_nonfinite_steps_can_be_skipped(tmp_path):
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "train.steps=6", "train.on_nonfinite=skip"])
    trainer = Trainer(cfg, source=NaNSource(bad_from=3))
    state = trainer.fit()
    assert state.step == 6 and state.skipped_steps == 3  # D steps 3, 4, 5 skipped; G stays finite
    weights = load_file(str(tmp_path / "generator_ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_bad_override_exits_with_a_message(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "distgan.train", "--config", "smoke", "train.stpes=3"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "did you mean 'train.steps'" in proc.stderr


def test_help_lists_keys():
    proc = subprocess.run([sys.executable, "-m", "distgan.train", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "train.batch_size = 64" in proc.stdout and "GLOBAL batch" in proc.stdout


@pytest.mark.timeout(120)
def test_fresh_start_never_overwrites_a_run(tmp_path):
    from distgan.config import ConfigError
    from tests.distributed.support import MemorySource

    cfg = load_config("smoke", [f"run.dir={tmp_path}", "train.steps=4", "log.every=1", "checkpoint.every=2"])
    Trainer(cfg, source=MemorySource()).fit()
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, .*checkpoints.*\): pass --resume auto"):
        Trainer(cfg, source=MemorySource())
    # a resume from step 2 drops the log lines written after that checkpoint
    Trainer(load_config("smoke", [f"run.dir={tmp_path}", "train.steps=3", "log.every=1"]), source=MemorySource(),
            resume=str(tmp_path / "checkpoints" / "step-00000002")).fit()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_sample_names_a_missing_or_corrupt_export(tmp_path):
    """One line and exit 2 for a missing or corrupt export, and nothing written (it was a traceback, exit 1)."""
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"junk")
    for export in (tmp_path / "missing.safetensors", corrupt):
        proc = subprocess.run([sys.executable, "-m", "distgan.sample", "--export", str(export), "--n", "2", "--out",
                               str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and str(export) in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
