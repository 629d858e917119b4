"""distgan as a library: the README's Python snippets run, every checkpoint loads and samples, a user's own G and
D (a module outside the package) train, resume, sample and evaluate through the commands, the public API is listed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distgan
from distgan.config import ConfigError, load_config
from distgan.export import ExportError
from distgan.metrics.features import CLASSIFIER_FILE, FeatureClassifier, save_classifier
from distgan.trainer import Trainer
from compare import assert_same_files
from tests.conftest import REPO, run_cli
from tests.distributed.support import MemorySource

README = REPO / "README.md"


def readme_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section ``## HEADING``, in order."""
    text = README.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_public_api_is_listed_and_loads_lazily():
    assert {"load_config", "fit", "Trainer", "load_generator", "generate", "build", "first_use", "GENERATORS",
            "LOSSES"} <= set(distgan.__all__)
    assert set(distgan.__all__) <= set(dir(distgan))
    for name in distgan.__all__:
        assert getattr(distgan, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        distgan.nothing  # noqa: B018
    # import distgan alone does not load torch: a command's config error comes before torch's import cost
    code = "import sys, distgan; assert 'torch' not in sys.modules, 'torch loaded'; distgan.load_config('smoke')"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.timeout(300)
def test_the_readmes_python_snippets_run(fashion_shards, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fashion_mnist_1k").symlink_to(fashion_shards)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("distgan.plots.plot_run", lambda run_dir: [])  # matplotlib adds seconds, proves nothing here
    blocks = readme_blocks("Python")
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    G, images = namespace["G"], namespace["images"]
    assert isinstance(G, torch.nn.Module) and not G.training and G.step == 20 and G.resolution == 28
    assert images.dtype.name == "uint8" and images.std() > 0
    # the same seed gives the same images as the command line's files
    run_cli("distgan.sample", "--run", str(tmp_path / "runs" / "python"), "--n", "2", "--out", str(tmp_path / "cli"))
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli" / "000000.png")), images[0, :, :, 0])
    assert namespace["G10"].step == 10


def _stopped_run(run: Path, stop_at: int) -> None:
    """A run of 12 steps that a STOP file ends after step ``stop_at`` (checkpoints every 4 steps; no export)."""
    cfg = load_config("smoke", [f"run.dir={run}", "train.steps=12", "checkpoint.every=4", "checkpoint.keep=5",
                                "train.stop_check_every=1", "log.gif=false", "log.sample_every=100"])
    trainer = Trainer(cfg, source=MemorySource())
    step = trainer.train_step

    def step_then_stop(*args):
        step(*args)
        if trainer.state.step == stop_at:
            (run / "STOP").write_text("")

    trainer.train_step = step_then_stop
    trainer.fit()


@pytest.mark.timeout(300)
def test_a_run_stopped_before_its_end_samples_and_evaluates(fashion_shards, tmp_path):
    run = tmp_path / "run"
    _stopped_run(run, stop_at=6)
    assert not (run / "generator_ema.safetensors").exists()
    steps = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert steps == ["step-00000004", "step-00000006"]
    newest = distgan.load_generator(run)
    assert newest.step == 6 and newest.source == run / "checkpoints" / "step-00000006" / "G_ema.safetensors"
    G_ema = load_file(str(newest.source))
    assert all(torch.equal(newest.net.state_dict()[k], v) for k, v in G_ema.items())
    # --step, a checkpoint folder, its G_ema file (str or Path) name the same generator
    by_step = distgan.load_generator(str(run), step=4)
    by_folder = distgan.load_generator(run / "checkpoints" / "step-00000004")
    by_file = distgan.load_generator(str(run / "checkpoints" / "step-00000004" / "G_ema.safetensors"))
    assert by_step.step == by_folder.step == by_file.step == 4
    assert torch.equal(by_step.generate(3, output="tensor"), by_file.generate(3, output="tensor"))
    assert not torch.equal(by_step.generate(3, output="tensor"), newest.generate(3, output="tensor"))
    with pytest.raises(ExportError, match=r"no checkpoint of step 5 \(it has: 4, 6"):
        distgan.load_generator(run, step=5)
    # the commands take the same
    run_cli("distgan.sample", "--run", str(run), "--n", "4", "--grid", "--out", str(tmp_path / "grid"))
    run_cli("distgan.sample", "--run", str(run), "--step", "4", "--n", "2", "--out", str(tmp_path / "pngs"))
    run_cli("distgan.sample", "--export", str(run / "checkpoints" / "step-00000004"), "--n", "2", "--out",
            str(tmp_path / "pngs4"))
    assert (tmp_path / "grid" / "grid.png").is_file()
    assert_same_files(tmp_path / "pngs" / "000001.png", tmp_path / "pngs4" / "000001.png")
    data = _shards_with_classifier(fashion_shards, tmp_path)
    record = json.loads(run_cli("distgan.eval", "--run", str(run), "--data", str(data), "--metrics", "fd", "--n",
                                "64", "--batch", "32").stdout)
    assert record["meta"]["step"] == 6 and record["fd"] > 0


def _shards_with_classifier(fashion_shards: Path, tmp_path: Path) -> Path:
    """The session's real images, copied, with an (untrained) feature classifier beside them."""
    data = tmp_path / "fm"
    shutil.copytree(fashion_shards, data)
    torch.manual_seed(0)
    save_classifier(FeatureClassifier(1, 28, 10), data / CLASSIFIER_FILE)
    return data


def test_a_damaged_newest_checkpoint_is_skipped_and_a_run_with_none_is_named(tmp_path):
    run = tmp_path / "run"
    _stopped_run(run, stop_at=6)
    with open(run / "checkpoints" / "step-00000006" / "G_ema.safetensors", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    assert distgan.load_generator(run).step == 4
    with pytest.raises(ExportError, match="checkpoint is damaged"):
        distgan.load_generator(run, step=6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no exported generator .* and no intact checkpoint"):
        distgan.load_generator(tmp_path / "empty")


USER_NETS_TAIL = '''

class CondG(TinyG):
    """Class-conditional: one embedding added to z (the contract: num_classes=K, called with y)."""

    def __init__(self, cfg, resolution, channels, num_classes, hidden=128):
        super().__init__(cfg, resolution, channels, hidden)
        self.embed = nn.Embedding(num_classes, cfg.z_dim)

    def forward(self, z, y):
        return super().forward(z + self.embed(y))
'''


def user_module(folder: Path) -> Path:
    """The README's my_nets.py, written into ``folder`` (outside the package)."""
    (block,) = [b for b in readme_blocks("Your own networks") if b.startswith("# my_nets.py")]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_nets.py").write_text(block + USER_NETS_TAIL)
    return folder


def run_with(path: Path, module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` with ``path`` on PYTHONPATH (the user's module) after this working tree."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(REPO), str(path)]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(600)
def test_a_users_own_networks_train_resume_sample_and_evaluate_through_the_commands(fashion_shards, tmp_path):
    nets = user_module(tmp_path / "user")
    data = _shards_with_classifier(fashion_shards, tmp_path)
    run = tmp_path / "run"
    own = ["generator.arch=my_nets:TinyG", "discriminator.arch=my_nets:TinyD", "generator.kwargs={hidden: 64}",
           f"data.path={data}", f"run.dir={run}", "checkpoint.every=4", "log.gif=false"]

    def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    ok(run_with(nets, "distgan.train", "--config", "smoke", *own, "train.steps=4"))
    ok(run_with(nets, "distgan.train", "--config", "smoke", *own, "train.steps=8", "--resume", "auto"))
    assert "arch: my_nets:TinyG" in (run / "config.yaml").read_text()
    export = json.loads((run / "generator_ema.json").read_text())
    assert export["generator"]["arch"] == "my_nets:TinyG" and export["generator"]["kwargs"] == {"hidden": 64}
    weights = load_file(str(run / "generator_ema.safetensors"))
    assert weights["net.0.weight"].shape == (64, 16)  # the user's layers with the user's kwargs
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 8
    ok(run_with(nets, "distgan.sample", "--run", str(run), "--n", "3", "--out", str(tmp_path / "pngs")))
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 3
    record = json.loads(ok(run_with(nets, "distgan.eval", "--run", str(run), "--metrics", "fd", "--n", "64",
                                    "--batch", "32")).stdout)
    assert record["fd"] > 0 and record["meta"]["step"] == 8
    # without the module on the path: one line naming the import path and the fix, exit 2
    proc = run_with(tmp_path / "elsewhere", "distgan.sample", "--run", str(run), "--n", "1", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "'my_nets:TinyG': cannot import my_nets" in proc.stderr and "PYTHONPATH" in proc.stderr


def test_a_users_conditional_generator_gets_num_classes_and_labels(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(user_module(tmp_path / "user")))
    cfg = load_config("smoke", [f"run.dir={tmp_path / 'run'}", "train.steps=2", "generator.arch=my_nets:CondG",
                                "generator.conditional=true", "discriminator.conditional=true", "log.gif=false"])
    trainer = Trainer(cfg, source=MemorySource(num_classes=3))
    trainer.fit()
    G = distgan.load_generator(tmp_path / "run")
    assert G.classes == ["bright0", "bright1", "bright2"] and G.net.embed.num_embeddings == 3
    assert not torch.equal(G.generate(2, classes=0, output="tensor"), G.generate(2, classes=2, output="tensor"))


def test_import_path_errors_are_one_line_config_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(user_module(tmp_path / "user")))
    cases = {
        "generator.arch=my_nets:Missing": "my_nets has no 'Missing'",
        "generator.arch=no_such_module:G": "cannot import no_such_module",
        "discriminator.arch=my_nets:nn": "names a module, not a class",
        "generator.kwargs={hidden: 3}": "only your own network",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config("smoke", [override])
    cfg = load_config("smoke", [f"run.dir={tmp_path / 'run'}", "generator.arch=my_nets:TinyG",
                                "generator.kwargs={depth: 3}"])
    with pytest.raises(ConfigError, match=r"TinyG\(cfg, resolution=28, channels=1, depth=...\) failed"):
        Trainer(cfg, source=MemorySource())
