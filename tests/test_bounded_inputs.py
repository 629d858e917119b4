"""Inputs bounded by construction: every size checked before it is allocated (distgan.limits), YAML that cannot
explode (distgan.safe_yaml), regular files only (distgan.data.untrusted), one error handler (distgan.cli).

Each case is one a careless user hit: it used to take gigabytes, hang or print a traceback; now it is one line
and exit status 2, quickly, under a memory cap.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from distgan import cli, limits
from distgan import prepare as prepare_cli
from distgan import sample as sample_cli
from distgan import train as train_cli
from distgan.checkpoint import CheckpointError, TrainState, load_checkpoint, save_checkpoint, verify_checkpoint
from distgan.config import ConfigError, GeneratorConfig, load_config
from distgan.data.raw import fit_image
from distgan.data.shards import WRITTEN_BESIDE_SHARDS, check_output_dir, write_shards
from distgan.errors import UserError, shown
from distgan.export import export_generator
from distgan.nn import build_generator
from distgan.rundir import claim_run_dir, RunDirLock
from compare import assert_same_text

REPO = Path(__file__).resolve().parents[1]
BIG = str(10**12)


def one_line_error(capsys, main, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def run_capped(args: list[str], memory_bytes: int = 3 << 30, timeout: float = 120) -> subprocess.CompletedProcess:
    """A distgan command in its own process under an address-space cap and a timeout."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two small shards of 8x8 gray images, with dataset.json."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    write_shards(images, [i % 4 for i in range(40)], out, classes=["a", "b", "c", "d"], shard_size=20, progress=False)
    return out


# ---------------------------------------------------------------- sizes from config keys


@pytest.mark.parametrize("overrides, expected", [
    ([f"train.batch_size={BIG}"], "'train.batch_size' = 1000000000000 needs at least"),
    (["discriminator.width=1000000", "discriminator.max_width=1000000"], "'discriminator.width' = 1000000 needs at least"),
    (["log.n_samples=1000000000"], "'log.n_samples' = 1000000000 needs at least"),
    ([f"run.seed={2**70}"], "'run.seed' = 1180591620717411303424: a seed must be an integer from 0 to 2**63 - 1"),
    ([f"eval.n={BIG}", "eval.metrics=[fd]"], "'eval.n' = 1000000000000 needs at least"),
    ([f"train.steps={10**18}"], "'train.steps' = 1000000000000000000: at most 99999999"),
    (["generator.arch=mlp", f"generator.hidden=[{','.join(['8'] * 1000)}]"], "'generator.hidden' lists 1000 hidden layers: at most 64"),
    (["run.dir=\"runs/a\\nb\""], "'run.dir' = 'runs/a\\nb' holds the control character '\\n'"),
    (["data.path=\"data/\\tx\""], "'data.path' = 'data/\\tx' holds the control character '\\t'"),
])
def test_config_sizes_are_refused_before_anything_is_built(capsys, overrides, expected):
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", *overrides])
    assert expected in line, line
    if "needs at least" in line:  # the refusal names the estimate and the limit
        assert "of memory, more than the" in line and "this machine gives the process" in line


def test_a_huge_batch_is_refused_quickly_under_a_memory_cap():
    started = time.monotonic()
    proc = run_capped(["distgan.train", "--config", "smoke", f"train.batch_size={BIG}"], memory_bytes=1 << 30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("distgan.train: error: config key 'train.batch_size'")
    assert time.monotonic() - started < 60


def test_the_machines_memory_is_the_limit_and_rlimit_lowers_it(monkeypatch):
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < limits.memory_limit() <= physical
    monkeypatch.setattr(limits.resource, "getrlimit", lambda _: (1 << 30, limits.resource.RLIM_INFINITY))
    assert limits.memory_limit() == min(1 << 30, limits.memory_limit())
    with pytest.raises(limits.LimitError, match=r"needs at least 2.1 GB of memory, more than the 1.1 GB"):
        limits.check_memory("x", 1, 2 << 30, "fix")


def test_the_training_check_uses_the_datas_size_before_building(monkeypatch):
    cfg = load_config("smoke", ["generator.arch=mlp", "discriminator.arch=mlp", "discriminator.hidden=[4096]"])
    limits.check_training(cfg, 28, 1, 16, None)  # 784 x 4096 weights: fits anywhere
    monkeypatch.setattr(limits, "memory_limit", lambda: 20 << 20)
    with pytest.raises(limits.LimitError, match=r"the run's networks for 1x28x28 images .*: 3791124 parameters\) with a batch of 16 per "
                       r"process needs at least 3[0-9.]+ MB of memory, more than the 21.0 MB"):
        limits.check_training(cfg, 28, 1, 16, None)


# ---------------------------------------------------------------- YAML


def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntrain: {{steps: *a{levels}}}\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(_bomb(9))
    tracemalloc.start()
    try:
        line = one_line_error(capsys, train_cli.main, ["--config", str(config)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "line 2: an alias (*a0); distgan does not expand YAML aliases" in line
    assert len(line) < 300 and peak < 50 << 20


def test_an_alias_in_an_override_is_refused(capsys):
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", "generator.hidden=[&a 8, *a]"])
    assert "an alias (*a)" in line


def test_duplicate_sections_and_keys_are_refused_by_name_and_line(tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  steps: 3\nlog:\n  every: 1\ntrain:\n  batch_size: 8\n")
    line = one_line_error(capsys, train_cli.main, ["--config", str(config)])
    assert f"{config}: line 5: the key 'train' appears again (first on line 1)" in line
    config.write_text("train: {steps: 3, steps: 4}\n")
    assert "the key 'steps' appears again" in one_line_error(capsys, train_cli.main, ["--config", str(config)])


def test_error_messages_show_only_a_prefix_of_a_value(capsys):
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", f"train.steps=[{','.join(['1'] * 20_000)}]"])
    assert len(line) < 300 and line.endswith("expected int")
    assert shown(10**5000) == "an integer of 16610 bits" and shown("x" * 1000).endswith("...")


def test_a_number_past_pythons_digit_limit_is_one_line(capsys):
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", "train.steps=" + "9" * 5000])
    assert "override 'train.steps=...': a value cannot be read" in line


# ---------------------------------------------------------------- regular files only


def test_a_fifo_as_data_path_is_refused_at_once(tmp_path):
    fifo = tmp_path / "shards.tar"
    os.mkfifo(fifo)
    proc = run_capped(["distgan.train", "--config", "smoke", f"data.path={fifo}", f"run.dir={tmp_path / 'r'}"],
                      timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(f"shard {fifo}: it is a FIFO (named pipe), not a regular "
                                                          "file; point at a file")


def test_a_fifo_as_config_export_or_dataset_json_is_refused_by_name(tmp_path, capsys, shards):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "it is a FIFO" in one_line_error(capsys, train_cli.main, ["--config", str(fifo)])
    line = one_line_error(capsys, sample_cli.main, ["--export", str(fifo), "--out", str(tmp_path / "o")])
    assert "it is a FIFO (named pipe)" in line
    folder = tmp_path / "d"
    folder.mkdir()
    os.mkfifo(folder / "dataset.json")
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", f"data.path={folder}"])
    assert "dataset.json" in line and "it is a FIFO" in line


# ---------------------------------------------------------------- dataset.json


def _edit_dataset_json(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    record = json.loads((dst / "dataset.json").read_text())
    record.update(changes)
    (dst / "dataset.json").write_text(json.dumps(record))
    return dst


def test_dataset_json_resolution_is_checked_against_the_images(tmp_path, capsys, shards):
    data = _edit_dataset_json(shards, tmp_path / "d", resolution=1000)
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", f"data.path={data}", "generator.arch=mlp",
                                                   "discriminator.arch=mlp", f"run.dir={tmp_path / 'r'}"])
    assert "says 1000x1000 images with 1 channel(s), but the first image of" in line and "is 28x28" in line


def test_dataset_json_classes_must_be_a_list_of_names(tmp_path, capsys, shards):
    data = _edit_dataset_json(shards, tmp_path / "d", classes=5)
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", f"data.path={data}",
                                                   f"run.dir={tmp_path / 'r'}"])
    assert "'classes' is 5: it must be a list of class names" in line


# ---------------------------------------------------------------- sample and prepare arguments, exports


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    g = GeneratorConfig(width=8, z_dim=16)
    path = tmp_path_factory.mktemp("export") / "g.safetensors"
    return export_generator(path, build_generator(g, 28, 1), g, 28, 1, None, 1, True)


@pytest.mark.parametrize("argv, expected", [
    (["--seed", str(10**23)], "--seed = 100000000000000000000000: a seed must be an integer from 0 to 2**63 - 1"),
    (["--seed2", "-1"], "--seed2 = -1: a seed must be"),
    (["--n", str(10**9)], "--n = 1000000000 needs at least 64.0 GB of memory"),
    (["--n", str(10**8), "--grid"], "--n = 100000000 needs at least"),
    (["--batch", str(10**9), "--n", "100"], None),  # the batch is never larger than --n: fine
])
def test_sample_sizes_and_seeds_are_checked_before_drawing(capsys, tmp_path, export, argv, expected):
    args = ["--export", str(export), "--out", str(tmp_path / "o"), *argv]
    if expected is None:
        assert sample_cli.main(args) == 0
        return
    assert expected in one_line_error(capsys, sample_cli.main, args)


def test_control_characters_in_flags_are_refused(capsys, tmp_path, export):
    line = one_line_error(capsys, sample_cli.main, ["--export", str(export), "--out", f"{tmp_path}/a\nb"])
    assert "--out = " in line and "holds the control character '\\n'" in line
    assert not (tmp_path / "a\nb").exists()


def test_an_export_listing_200000_hidden_layers_is_refused_before_building(tmp_path, capsys):
    path = tmp_path / "g.safetensors"
    meta = {"format_version": 1, "generator": {"arch": "mlp", "z_dim": 4, "hidden": [1] * 200_000},
            "resolution": 8, "channels": 1, "classes": None, "step": 1, "ema": True}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"distgan": json.dumps(meta)})
    tracemalloc.start()
    try:
        line = one_line_error(capsys, sample_cli.main, ["--export", str(path), "--out", str(tmp_path / "o")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "generator.hidden lists 200000 hidden layers: at most 64: the export is damaged" in line
    assert peak < 100 << 20


def test_prepare_refuses_a_huge_resolution_before_reading(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "a.png")
    line = one_line_error(capsys, prepare_cli.main, ["folder", "--src", str(src), "--out", str(tmp_path / "o"),
                                                     "--resolution", "30000", "--no-progress"])
    assert "--resolution = 30000: a resolution must be an integer from 1 to 4096" in line


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I;16")
        out = fit_image(image, None, 1)[:, :, 0]
    np.testing.assert_array_equal(out, np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8))
    assert (out == 255).mean() < 0.01


def test_a_shard_folder_with_distgans_eval_cache_may_be_replaced(tmp_path, shards):
    from distgan.metrics.evaluator import CACHE_DIR
    from distgan.metrics.features import CLASSIFIER_FILE

    assert {CACHE_DIR, CLASSIFIER_FILE, Path(CLASSIFIER_FILE).with_suffix(".json").name} == set(WRITTEN_BESIDE_SHARDS)
    import shutil

    out = tmp_path / "out"
    shutil.copytree(shards, out)
    (out / CACHE_DIR).mkdir()
    check_output_dir(out, force=True)  # distgan wrote every entry
    (out / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="'mine.txt', which distgan did not write"):
        check_output_dir(out, force=True)


# ---------------------------------------------------------------- checkpoints and run dirs


def _checkpoint(tmp_path: Path) -> Path:
    net = torch.nn.Linear(2, 2)
    return save_checkpoint(tmp_path / "checkpoints", TrainState(step=5, images_seen=80, batches_consumed=5),
                           {"G": net}, {}, keep=2)


def test_a_state_json_whose_step_is_not_its_folders_is_damaged(tmp_path):
    path = _checkpoint(tmp_path)
    assert verify_checkpoint(path) is None
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "step": 10**18}))
    assert "step is 1000000000000000000 in a checkpoint named step-00000005" in verify_checkpoint(path)
    (path / "state.json").write_text(json.dumps({**state, "images_seen": 2**70}))
    assert "images_seen is 1180591620717411303424, past an int64" in verify_checkpoint(path)


def test_a_checkpoint_of_another_shape_is_a_checkpoint_error(tmp_path):
    path = _checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the model built from the config"):
        load_checkpoint(path, {"G": torch.nn.Linear(3, 2)})


def test_a_start_that_crashed_before_step_1_is_not_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "0001-start-step-00000000.yaml").write_text("{}")
    (run / "config.yaml").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    assert claim_run_dir(RunDirLock(run), None, "{}") is None  # a fresh start is allowed
    RunDirLock(run).path.unlink()
    assert claim_run_dir(RunDirLock(run), "auto", "{}") is None
    assert not list(run.glob("previous-*"))  # nothing set aside


def test_resume_auto_never_moves_a_users_own_folder(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "samples" / "holiday.jpg").write_text("mine")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="samples there holds files distgan did not write"):
        claim_run_dir(RunDirLock(run), "auto", "{}")
    assert_same_text((run / "samples" / "holiday.jpg").read_text(), "mine", "the user's file")
    assert not list(run.glob("previous-*"))


# ---------------------------------------------------------------- the one error handler


def _raises(err: BaseException):
    def body() -> int:
        raise err
    return body


@pytest.mark.parametrize("err, status, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/x"), 2, "/runs/a/x: the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 2, "/root/x: permission denied"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300), 2, "the name is too long for the file system"),
    (json.JSONDecodeError("Expecting value", "{", 1), 2, "a JSON file is damaged (Expecting value at line 1)"),
    (KeyboardInterrupt(), 130, "distgan.x: interrupted (Ctrl-C)"),
])
def test_what_a_user_can_cause_is_one_line_and_a_status(capsys, err, status, expected):
    assert cli.run_command("distgan.x", _raises(err)) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and len(lines[0]) < 400, lines


def test_safetensors_and_wandb_errors_are_one_line(capsys, tmp_path):
    from safetensors import SafetensorError
    import wandb.errors

    assert cli.run_command("distgan.x", _raises(SafetensorError("invalid header"))) == 2
    assert "a weights file cannot be read (invalid header)" in capsys.readouterr().err
    assert cli.run_command("distgan.x", _raises(wandb.errors.UsageError("No API key configured."))) == 2
    line = capsys.readouterr().err.strip()
    assert "wandb: No API key configured." in line and "WANDB_MODE=offline" in line
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.run_command("distgan.x", _raises(ZeroDivisionError()))


def test_wandb_online_without_its_server_falls_back_to_offline(monkeypatch):
    import wandb
    import wandb.errors

    from distgan.tracking import init_trackers

    class FakeAccelerator:
        log_with = ["wandb"]
        calls_teardown: list = []

        def __init__(self):
            self.calls, self.trackers = [], []

        def init_trackers(self, project, config, init_kwargs):
            self.calls.append((os.environ["WANDB_MODE"], dict(init_kwargs["wandb"])))
            self.trackers.append("half")
            if len(self.calls) == 1:
                raise wandb.errors.CommError("Timed out while retrying")

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "teardown", lambda: FakeAccelerator.calls_teardown.append(1))
    acc = FakeAccelerator()
    init_trackers(acc, "p", {}, {"dir": "runs/x"})
    (mode1, kwargs1), (mode2, kwargs2) = acc.calls
    assert mode1 == "online" and kwargs1["settings"].init_timeout == 30.0  # a bounded wait
    assert mode2 == "offline" and "settings" not in kwargs2 and acc.trackers == ["half"]
    assert FakeAccelerator.calls_teardown == [1]
    monkeypatch.setenv("WANDB_MODE", "online")

    class NoKey(FakeAccelerator):
        def init_trackers(self, project, config, init_kwargs):
            raise wandb.errors.UsageError("No API key configured.")

    with pytest.raises(wandb.errors.UsageError):  # the user's to fix: not hidden by a fallback
        init_trackers(NoKey(), "p", {}, {})
