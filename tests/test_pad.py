"""data.pad: real images padded with background (28x28 -> 32x32 for the 32x32 DCGAN), generated images cropped back
wherever they are scored or shown (evaluation, sample grids, the export's distgan.sample and distgan.eval)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distgan.config import Config, ConfigError, DiscriminatorConfig, GeneratorConfig, dump_yaml, load_config
from distgan.data.stream import make_batch_iterator
from distgan.eval import main as eval_main
from distgan.export import ExportError, export_generator, load_generator_export
from distgan.data.shards import read_dataset_info
from distgan.metrics.evaluator import Evaluator
from distgan.metrics.feature_net import ensure_feature_net
from distgan.nn import (
    DISCRIMINATORS, GENERATORS, RESOLUTIONS, CenterCrop, build_discriminator, build_generator,
)
from distgan.rundir import config_changes
from distgan.sample import main as sample_main
from distgan.train import main as train_main
from distgan.trainer import Trainer
from test_every_option import TINY, fast  # noqa: F401 (fast is a fixture)
from tests.distributed.support import MemorySource

pytestmark = pytest.mark.timeout(300)


def tiny(run_dir: Path, data: Path | str = "unused", *overrides: str) -> Config:
    return load_config(None, [*TINY, "data.pad=2", f"data.path={data}", f"run.dir={run_dir}", *overrides])


def test_padded_batches_have_a_background_border_around_the_data(fashion_shards, tmp_path, fast):
    """Both paths the real batches take (float from the stream; uint8 normalised on the device, the GPU path) give
    the same 32x32 batch: the border exactly -1 (pixel 0), the centre the unpadded batch."""
    cfg = tiny(tmp_path / "run", fashion_shards)
    trainer = Trainer(cfg)
    assert (trainer.source.resolution, trainer.resolution) == (28, 32)
    padded = {}
    for raw in (False, True):
        stream = make_batch_iterator(cfg.data, 8, 0, 1, cfg.run.seed, raw=raw)
        padded[raw], _ = trainer._next_real(stream)
        stream.close()
    plain, _ = next(make_batch_iterator(cfg.data, 8, 0, 1, cfg.run.seed))
    assert padded[False].shape == (8, 1, 32, 32) and torch.equal(padded[False], padded[True])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((padded[False][..., border] == -1.0).all())
    assert torch.equal(padded[False][..., 2:30, 2:30], plain) and not bool((plain == -1.0).all())


@pytest.fixture(scope="module")
def padded_run(fashion_shards, tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(run dir, data) of a 2-step data.pad=2 run on a copy of the Fashion-MNIST shards, evaluated at its end (its
    feature classifier, trained on first use, stays in a cache folder of this module's)."""
    root = tmp_path_factory.mktemp("pad")
    data = root / "fm"
    shutil.copytree(fashion_shards, data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTGAN_CACHE", str(root / "cache"))
        yield root / "run", data


def test_a_padded_run_trains_at_32_and_scores_and_shows_28(padded_run, monkeypatch, fast):
    run, data = padded_run
    seen = []
    batch_features = Evaluator._batch_features
    monkeypatch.setattr(Evaluator, "_batch_features", lambda self, x: seen.append(tuple(x.shape[1:]))
                        or batch_features(self, x))
    cfg = tiny(run, data, "eval.metrics=[fd]", "eval.n=8", "eval.batch=8", "eval.classifier_steps=5")
    ensure_feature_net(cfg.eval, str(data), read_dataset_info(str(data)))  # first use's work (distgan.fit does it)
    trainer = Trainer(cfg)
    trainer.fit()
    with torch.no_grad():
        assert trainer.G_plain(trainer.fixed_z).shape[1:] == (1, 32, 32)  # G and D work at the padded size
    assert trainer.last_eval is not None and trainer.last_eval[0] == 2
    assert seen and set(seen) == {(1, 28, 28)}, seen  # the feature net saw 28x28 only, generated images included
    # the grids show the cropped images: 4 images, 2 per row, 28 pixels each plus 2 of spacing
    grid = Image.open(run / "samples" / "g_ema-step-00000002.png")
    assert grid.size == (2 * 30 + 2, 2 * 30 + 2)
    meta = json.loads((run / "generator_ema.json").read_text())
    assert (meta["resolution"], meta["pad"]) == (32, 2)


def test_the_export_of_a_padded_run_samples_and_evaluates_at_28(padded_run, monkeypatch, capsys):
    run, data = padded_run
    if not (run / "generator_ema.safetensors").is_file():
        pytest.skip("needs test_a_padded_run_trains_at_32_and_scores_and_shows_28's run")
    model, meta = load_generator_export(run / "generator_ema.safetensors")
    assert isinstance(model, CenterCrop) and meta["pad"] == 2
    assert sample_main(["--export", str(run / "generator_ema.safetensors"), "--n", "3", "--out",
                        str(run / "out")]) == 0
    assert [Image.open(p).size for p in sorted((run / "out").glob("*.png"))] == [(28, 28)] * 3
    seen = []
    batch_features = Evaluator._batch_features
    monkeypatch.setattr(Evaluator, "_batch_features", lambda self, x: seen.append(tuple(x.shape[1:]))
                        or batch_features(self, x))
    capsys.readouterr()
    assert eval_main(["--run", str(run), "--n", "8", "--metrics", "fd"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fd"] > 0
    assert seen and set(seen) == {(1, 28, 28)}, seen


def test_an_export_without_pad_loads_unpadded_and_a_damaged_pad_is_refused(tmp_path):
    """Exports written before data.pad existed have no 'pad': they were not padded."""
    cfg = GeneratorConfig(arch="dcgan", z_dim=8, width=4)
    torch.manual_seed(0)
    model = build_generator(cfg, 32, 1).eval()
    path = export_generator(tmp_path / "g.safetensors", model, cfg, 32, 1, None, 5, ema=True, pad=2)
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["distgan"])
    z = torch.randn(3, 8)
    with torch.no_grad():
        loaded, _ = load_generator_export(path)
        assert torch.equal(loaded(z), model(z)[..., 2:30, 2:30])
        del meta["pad"]
        save_file(load_file(str(path)), str(path), metadata={"distgan": json.dumps(meta)})
        loaded, loaded_meta = load_generator_export(path)
        assert loaded_meta["pad"] == 0 and torch.equal(loaded(z), model(z))
    meta["pad"] = 16
    save_file(load_file(str(path)), str(path), metadata={"distgan": json.dumps(meta)})
    with pytest.raises(ExportError, match="metadata says pad 16 for resolution 32"):
        load_generator_export(path)


def test_a_bad_pad_is_one_line_naming_the_key(fashion_shards, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"config key 'data.pad' = -1: must be 0 or more"):
        load_config(None, ["data.pad=-1"])
    with pytest.raises(ConfigError, match=r"'data.pad' = 1.5: expected int"):
        load_config(None, ["data.pad=1.5"])
    run = ["--config", "smoke", f"data.path={fashion_shards}", f"run.dir={tmp_path / 'run'}", "log.progress_bar=false"]
    for pad, message in ((-1, "config key 'data.pad' = -1: must be 0 or more"),
                         (3, "config key 'data.pad' = 3: pads the 28x28 images to 34x34, which generator.arch=dcgan "
                             "does not support (supported: 28, 32, 64, 128)")):
        assert train_main([*run, f"data.pad={pad}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("distgan.train: error: ") and message in err[-1], err
    with pytest.raises(ConfigError, match=r"34x34, which discriminator.arch=tf_dcgan does not support \(supported: "
                                          r"multiples of 4\)"):
        Trainer(tiny(tmp_path / "tf", "unused", "data.pad=3", "generator.arch=mlp", "discriminator.arch=tf_dcgan"),
                source=MemorySource())
    assert not (tmp_path / "tf" / ".lock").exists()


def test_each_architecture_says_which_resolutions_it_builds_at():
    """RESOLUTIONS (data.pad's check) agrees with the builders, for every architecture."""
    assert set(RESOLUTIONS) == set(GENERATORS) | set(DISCRIMINATORS)
    for arch, (builds, _) in RESOLUTIONS.items():
        for resolution in (6, 8, 28, 30, 32):
            built = []
            if arch in GENERATORS:
                built.append(lambda: build_generator(GeneratorConfig(arch=arch, width=4, max_width=8, hidden=[8]),
                                                     resolution, 1))
            if arch in DISCRIMINATORS:
                built.append(lambda: build_discriminator(DiscriminatorConfig(arch=arch, width=4, max_width=8,
                                                                             hidden=[8], maxout_pieces=2), resolution, 1))
            for build in built:
                try:
                    build()
                    ok = True
                except ConfigError:
                    ok = False
                assert ok == builds(resolution), (arch, resolution)


def test_a_run_saved_before_data_pad_existed_resumes_unpadded(tmp_path, fast):
    """Its config.yaml has no data.pad: it meant 0, so the resume goes on; asking for a pad then is refused."""
    def smoke(steps: int) -> Config:
        return load_config("smoke", [f"run.dir={tmp_path}", f"train.steps={steps}", "log.every=1",
                                     "log.sample_every=1000", "log.gif=false", "log.progress_bar=false"])

    cfg = smoke(2)
    Trainer(cfg, source=MemorySource()).fit()
    step = tmp_path / "checkpoints" / "step-00000002"
    for path in (tmp_path / "config.yaml", step / "config.yaml"):
        saved = yaml.safe_load(path.read_text())
        del saved["data"]["pad"]
        path.write_text(yaml.safe_dump(saved, sort_keys=False))
    state = json.loads((step / "state.json").read_text())
    body = (step / "config.yaml").read_bytes()
    state["manifest"]["config.yaml"] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (step / "state.json").write_text(json.dumps(state, indent=2))
    old, now = (step / "config.yaml").read_text(), dump_yaml(cfg)
    assert "pad" not in yaml.safe_load(old)["data"] and config_changes(old, now) == ([], [])
    padded = yaml.safe_load(now)
    padded["data"]["pad"] = 2
    assert config_changes(old, yaml.safe_dump(padded))[0] == ["data.pad: 0 -> 2"]
    resumed = Trainer(smoke(3), source=MemorySource(), resume="auto")
    assert resumed.resumed_from == step and (resumed.pad, resumed.resolution) == (0, 28)
    resumed.fit()
    assert resumed.state.step == 3

