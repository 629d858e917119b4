"""The commands' outputs through distgan.output: sample never writes over the user's files, prepare never deletes a
folder that appeared during its write, two writers of one --out never both succeed, sample streams, and the end of a
training run writes its checkpoint and export before anything that may fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compare import assert_same_bytes, assert_same_text
import distgan.sample
from distgan.config import ConfigError, GeneratorConfig, load_config
from distgan.data.shards import write_shards
from distgan.export import export_generator
from distgan.nn import build_generator
from distgan.output import Output, OutputError
from distgan.sample import main as sample_main
from tests.distributed.support import MemorySource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def export(tmp_path) -> Path:
    cfg = GeneratorConfig(arch="mlp", z_dim=8, hidden=[16])
    torch.manual_seed(0)
    return export_generator(tmp_path / "g.safetensors", build_generator(cfg, 8, 1), cfg, 8, 1, None, 1, ema=True)


@pytest.mark.parametrize("mode, name", [([], "000000.png"), (["--grid"], "grid.png"),
                                        (["--interpolate"], "interpolation.png")])
def test_sample_refuses_to_write_over_the_users_file(export, tmp_path, capsys, mode, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's picture")
    assert sample_main(["--export", str(export), "--n", "4", "--out", str(out), *mode]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distgan.sample: error: ") and name in err and "\n" not in err, err
    assert_same_bytes((out / name).read_bytes(), b"the user's picture", name)
    assert [p.name for p in out.iterdir()] == [name]


def test_sample_force_replaces_only_what_sample_writes(export, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample_main(["--export", str(export), "--n", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert sample_main(["--export", str(export), "--n", "2", "--out", str(out)]) == 2  # no --force: kept
    assert sample_main(["--export", str(export), "--n", "2", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    (out / "notes.txt").write_text("mine")
    assert sample_main(["--export", str(export), "--n", "2", "--out", str(out), "--force"]) == 2
    assert "notes.txt, which is not a sampled image" in capsys.readouterr().err
    assert_same_text((out / "notes.txt").read_text(), "mine", "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.safetensors", "out"]  # nothing hidden left


def test_sample_streams_in_blocks_and_bounds_a_grid_by_its_size(export, tmp_path, capsys, monkeypatch):
    import distgan.generation as generation

    drawn = []
    real = generation.sample_latent
    monkeypatch.setattr(generation, "sample_latent", lambda n, *a: drawn.append(n) or real(n, *a))
    model = build_generator(GeneratorConfig(arch="mlp", z_dim=8, hidden=[16]), 8, 1).eval()
    images = distgan.sample.stream(model, 5_000_000, 8, "normal", 0, 64)
    first = next(images)  # generated on demand: one block of latents drawn, nothing else held
    assert first.shape == (64, 1, 8, 8) and drawn == [generation.LATENT_BLOCK]
    monkeypatch.undo()
    # the streamed latents are generate()'s (the same images as the Python API), across a block boundary and for
    # any --batch
    n = generation.LATENT_BLOCK + 100
    same = torch.nn.Identity()
    streamed = torch.cat(list(distgan.sample.stream(same, n, 8, "normal", 0, 7_000, truncation=1.0)))
    assert torch.equal(streamed, generation.latents(n, 8, "normal", 0, truncation=1.0)) and streamed.abs().max() <= 1
    assert torch.equal(streamed, torch.cat(list(distgan.sample.stream(same, n, 8, "normal", 0, 512, truncation=1.0))))
    assert sample_main(["--export", str(export), "--n", "5000000", "--grid", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "--n with --grid: a grid of 5000000 images" in err and "at most 1048576 images" in err
    assert not (tmp_path / "g").exists()


def _images(count: int, during=None):
    for i in range(count):
        if i == count // 2 and during is not None:
            during()
        yield np.full((8, 8), i % 256, np.uint8)


def test_prepare_keeps_a_folder_that_appears_at_its_out_during_the_write(tmp_path):
    out = tmp_path / "data"

    def user_makes_it():
        out.mkdir()
        (out / "mine.txt").write_text("mine")

    with pytest.raises(OutputError, match="appeared while distgan was writing it; it was kept"):
        write_shards(_images(20, user_makes_it), None, out, shard_size=5, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # the partial shards are gone


def test_two_writers_of_one_out_never_both_succeed(tmp_path):
    out = tmp_path / "data"
    second: list = []

    def another_prepare():
        with pytest.raises(OutputError, match=rf"being written by another distgan process \(pid {os.getpid()}\)"):
            write_shards(_images(4), None, out, shard_size=5, progress=False)
        second.append("refused")

    info = write_shards(_images(20, another_prepare), None, out, shard_size=5, progress=False)
    assert second == ["refused"] and info.count == 20 and len(list(out.glob("shard-*.tar"))) == 4


def test_the_prepare_command_fails_on_the_lock_of_a_writer_of_its_out(tmp_path):
    """The real command, while another writer (here: this test, as a prepare would) holds --out's lock."""
    src = tmp_path / "src.npz"
    np.savez(src, images=np.zeros((10, 8, 8), np.uint8))
    out = tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with Output(out, folder=True):
        proc = subprocess.run([sys.executable, "-m", "distgan.prepare", "npz", "--src", str(src), "--out", str(out),
                               "--no-progress"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"distgan.prepare: error: --out {out} is being written by another distgan process (pid {os.getpid()}); "
        "wait for it to finish or choose another --out")


def _smoke(run: Path, *extra: str):
    return load_config("smoke", [f"run.dir={run}", "train.steps=2", "log.every=1", "log.sample_every=1000",
                                 "log.gif=true", "ema.enabled=false", *extra])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("failing", ["evaluation", "plots"])
def test_the_final_checkpoint_and_export_come_before_what_may_fail(tmp_path, monkeypatch, capsys, failing):
    from distgan.trainer import Trainer

    def fail(*_args, **_kwargs):
        raise ConfigError(f"the {failing} failed")

    trainer = Trainer(_smoke(tmp_path / "run"), source=MemorySource())
    if failing == "evaluation":
        trainer.evaluator = object()  # as with eval.metrics set: the last step is evaluated in _finish
        monkeypatch.setattr(trainer, "evaluate", fail)
    else:
        monkeypatch.setattr("distgan.plots.plot_run", fail)
    with pytest.raises(ConfigError, match=f"the {failing} failed"):
        trainer.fit()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000002" / "state.json").is_file()
    assert (run / "generator_ema.safetensors").is_file() and not (run / ".lock").exists()
    said = capsys.readouterr()
    assert (f"trained 2 steps; checkpoint {run / 'checkpoints' / 'step-00000002'} and export "
            f"{run / 'generator_ema.safetensors'} written; the end of the run failed: the {failing} failed"
            in said.out + said.err)


def test_an_export_replaces_only_an_earlier_export(tmp_path):
    cfg = GeneratorConfig(arch="mlp", z_dim=8, hidden=[16])
    model = build_generator(cfg, 8, 1)
    path = export_generator(tmp_path / "g.safetensors", model, cfg, 8, 1, None, 1, ema=True)
    export_generator(path, model, cfg, 8, 1, None, 2, ema=True)  # the run's own, replaced
    assert json.loads(path.with_suffix(".json").read_text())["step"] == 2
    path.write_bytes(b"the user's file")
    with pytest.raises(OutputError, match="is not a distgan export; it was kept"):
        export_generator(path, model, cfg, 8, 1, None, 3, ema=True)
    assert_same_bytes(path.read_bytes(), b"the user's file", str(path))
