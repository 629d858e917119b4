"""Every user error in every command is one line naming the file, key or value, and exit status 2.

The commands' main() functions run in-process (the same code as the console scripts, without a second of
torch import per case); one case goes through a real process to check the exit status end to end.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distgan import eval as eval_cli
from distgan import sample as sample_cli
from distgan import train as train_cli
from distgan.checkpoint import list_checkpoints
from distgan.config import ConfigError, GeneratorConfig, load_config, section_from_dict
from distgan.nn import build_generator
from distgan.trainer import Trainer
from tests.distributed.support import MemorySource

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, main, argv) -> str:
    """Run a command that must fail on user input; return its one stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("overrides, expected", [
    (["train.max_grad_norm=-1"], "'train.max_grad_norm' = -1.0: must be 0 or more"),
    (["loss.penalty_weight=-10"], "'loss.penalty_weight' = -10.0: must be 0 or more"),
    (["ema.half_life_kimg=-1"], "'ema.half_life_kimg' = -1.0: must be 0 or more"),
    (["data.cache_mb=-1"], "'data.cache_mb' = -1: must be 0 or more"),
    (["run.seed=-1"], "'run.seed' = -1: must be 0 or more"),
    (["data.shards_per_block=0"], "'data.shards_per_block' = 0: must be at least 1"),
    (["g_optim.lr=.nan"], "'g_optim.lr' = nan: must be a finite number"),
    (["train.collective_timeout_s=.inf"], "'train.collective_timeout_s' = inf: must be a finite number"),
    (["data.prepare_timeout_s=0"], "'data.prepare_timeout_s' = 0.0: must be positive (seconds)"),
    (["train.collective_timeout_s=-1"], "'train.collective_timeout_s' = -1.0: must be positive (seconds)"),
    (["discriminator.hidden=[64, -3]"], "'discriminator.hidden[1]' = -3: must be at least 1"),
    (["generator.width=100000000"], "'generator.width' = 100000000: must be between 1 and 65536"),
    (["train.steps=[1"], "override 'train.steps=[1': the value is not valid YAML"),
    ([f"train.steps={DEEP}"], "override 'train.steps=...': the value is nested too deeply"),
    (["augment.policy=[rotate]"], "'augment.policy[0]' = 'rotate': expected one of 'translation', 'cutout', 'color'"),
    (["augment.p=2"], "'augment.p' = 2.0: must be in [0, 1]"),
])
def test_train_refuses_bad_values_in_one_line(capsys, overrides, expected):
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", *overrides])
    assert line.startswith("distgan.train: error: ") and expected in line


def test_train_overrides_may_come_before_the_flags():
    args = train_cli.parse_args(["train.steps=3", "--config", "smoke", "log.every=1", "--resume", "auto"])
    assert args.config == "smoke" and args.resume == "auto" and args.overrides == ["train.steps=3", "log.every=1"]


def test_train_with_missing_data_names_the_prepare_command(tmp_path):
    """Through a real process: the mission's command on a machine without the data."""
    proc = subprocess.run([sys.executable, "-m", "distgan.train", "--config", "smoke", f"run.dir={tmp_path / 'r'}",
                           f"data.path={tmp_path / 'nothing'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and str(tmp_path / "nothing") in errors[0] and "distgan.prepare" in errors[0]


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="run.seed"):
        train_cli.main(["--config", "smoke", "run.seed=-1", "--debug"])


def test_train_resume_from_a_missing_checkpoint(capsys, tmp_path):
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", f"run.dir={tmp_path}", "data.path=x",
                                                   "--resume", str(tmp_path / "step-9")])
    assert "no such folder" in line or "no checkpoint there" in line


def test_train_resume_with_a_changed_seed_names_the_key(capsys, tmp_path, monkeypatch):
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", "train.steps=1", "log.sample_every=1000", "log.gif=false"]
    Trainer(load_config("smoke", overrides), source=MemorySource()).fit()
    # the command builds its data source from data.path: give it the same memory source instead
    monkeypatch.setattr("distgan.build.build_source", lambda cfg, accelerator: MemorySource())
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", *overrides, "train.steps=2", "run.seed=7",
                                                   "--resume", "auto"])
    assert line.startswith("distgan.train: error: resuming ") and "run.seed: 0 -> 7" in line
    assert "train.steps" not in line  # a change a resume may make is not listed
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000001"]


@pytest.mark.parametrize("path", ["PIPE:touch {marker}", " pipe:touch {marker}", "Pipe:touch {marker}"])
def test_train_refuses_a_pipe_data_path_in_any_spelling_before_anything_runs(capsys, tmp_path, path):
    marker = tmp_path / "ran"
    line = one_line_error(capsys, train_cli.main, ["--config", "smoke", f"run.dir={tmp_path / 'r'}",
                                                   f"data.path={path.format(marker=marker)}"])
    assert "'pipe:' URLs run shell commands; set data.allow_pipe=true" in line
    assert not marker.exists() and not (tmp_path / "r").exists()


def _export(path: Path, meta: dict, tensors=None) -> Path:
    save_file(tensors or {"w": torch.zeros(1)}, str(path), metadata={"distgan": json.dumps(meta)})
    return path


GOOD_META = {"format_version": 1, "generator": {"arch": "mlp", "z_dim": 4, "hidden": [8]}, "resolution": 8,
             "channels": 1, "classes": None, "step": 1, "ema": True}


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file or folder; give a run dir, an export"),
    ("junk", "not a readable safetensors file"),
    ("huge", "resolution 1000000000 and channels 1"),
    ("huge-network", "they do not match its metadata"),  # 51 GB of weights asked for: refused before allocating
    ("weights-shape", "net.0.weight: F32 [8, 5] in the file, the metadata's network needs F32 [8, 4]"),
    ("bad-generator", "generator section of its metadata is not valid: config key 'generator.hidden[0]' = -8"),
    ("weights-mismatch", "its weights cannot be loaded"),
    ("n0", "--n 0: must be at least 1"),
])
def test_sample_refuses_bad_exports_and_arguments(capsys, tmp_path, case, expected):
    path = tmp_path / "g.safetensors"
    n = "4"
    if case == "junk":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif case == "huge":
        _export(path, {**GOOD_META, "resolution": 10**9})
    elif case == "huge-network":
        _export(path, {**GOOD_META, "generator": {"arch": "mlp", "z_dim": 4, "hidden": [65536]}, "resolution": 256,
                       "channels": 3})
    elif case == "weights-shape":  # the right keys, one tensor of another shape
        with torch.device("meta"):
            names = build_generator(section_from_dict(GeneratorConfig, GOOD_META["generator"], "generator"), 8, 1)
        tensors = {k: torch.zeros(v.shape) for k, v in names.state_dict().items()}
        tensors[next(iter(tensors))] = torch.zeros(8, 5)
        _export(path, GOOD_META, tensors)
    elif case == "bad-generator":
        _export(path, {**GOOD_META, "generator": {"arch": "mlp", "hidden": [-8]}})
    elif case in ("weights-mismatch", "n0"):
        _export(path, GOOD_META)
        n = "0" if case == "n0" else n
    line = one_line_error(capsys, sample_cli.main, ["--export", str(path), "--n", n, "--out", str(tmp_path / "o")])
    assert line.startswith("distgan.sample: error: ") and expected in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--device", "bogus"], "--device bogus: "),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no GPU, or not that many
    (["--n", "0"], "--n 0: must be at least 2"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--classifier-steps", "0"], "--classifier-steps 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["stats", "--n", "1"], "--n 1: must be at least 2"),
    (["stats", "--device", "bogus"], "--device bogus: "),
    (["train-features", "--batch", "0"], "--batch 0: must be at least 1"),
    (["train-features", "--lr", "nan"], "--lr nan: must be a positive finite number"),
])
def test_eval_refuses_bad_flags_before_reading_anything(capsys, tmp_path, argv, expected):
    """Checked first: the export and the data named here do not exist, and the error is still about the flag."""
    missing = str(tmp_path / "nothing")
    if argv[0] == "stats":
        argv = ["stats", "--data", missing, "--out", str(tmp_path / "ref.npz"), *argv[1:]]
    elif argv[0] == "train-features":
        argv = ["train-features", "--data", missing, *argv[1:]]
    else:
        argv = ["--export", missing + ".safetensors", "--data", missing, *argv]
    line = one_line_error(capsys, eval_cli.main, argv)
    assert line.startswith("distgan.eval: error: " + expected), line


def test_eval_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    line = one_line_error(capsys, eval_cli.main, ["--run", str(tmp_path)])
    assert "config.yaml not found" in line
    line = one_line_error(capsys, eval_cli.main, ["plot", "--run", str(tmp_path)])
    assert "metrics.jsonl not found" in line
