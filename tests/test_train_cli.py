"""``python -m distgan.train``'s command line through real processes: --config is required, --print-config,
--help with the named config's values and choices, and precision errors that name where the setting came from."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distgan.config import Config, config_names, key_choices, load_config
from distgan.distributed import launcher_precision_source

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def run_train(*args: str, cwd: Path, launcher: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """``python -m distgan.train ARGS`` (behind ``launcher``, e.g. accelerate launch) from ``cwd``, this working
    tree first on the import path; never fails by itself."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    environ = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", **env}
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        if name not in env:
            environ.pop(name, None)
    command = [*(launcher or (sys.executable,)), "-m", "distgan.train", *args]
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=100)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if ": error: " in line and not line.startswith("RuntimeError")]


def test_no_config_is_usage_and_exit_2_naming_the_configs(tmp_path):
    proc = run_train("train.steps=1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: python -m distgan.train")
    (line,) = error_lines(proc)
    assert "pass --config NAME_OR_PATH" in line and all(name in line for name in ("fashion_mnist", "smoke", "cifar10"))
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir()), "nothing is trained nor written"


def test_print_config_prints_the_resolved_yaml_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    overrides = ["train.steps=3", f"run.dir={run}", "generator.width=16"]
    proc = run_train("--config", "smoke", *overrides, "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    assert load_config(str(printed)) == load_config("smoke", overrides)
    assert yaml.safe_load(proc.stdout)["train"]["steps"] == 3
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]
    bad = run_train("--config", "smoke", "train.stpes=3", "--print-config", cwd=tmp_path)
    assert bad.returncode == 2 and error_lines(bad) == ["distgan.train: error: unknown config key 'train.stpes' "
                                                        "(did you mean 'train.steps'?)"]


def test_help_shows_the_named_configs_values_and_every_choice(tmp_path):
    proc = run_train("--config", "fashion_mnist", "train.steps=11", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config("fashion_mnist", ["train.steps=11"])
    lines = proc.stdout.splitlines()
    with_choices = 0
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            key, value = f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name)
            (line,) = [l for l in lines if l.startswith(f"  {key} = ")]
            assert line.startswith(f"  {key} = {value!r}"), line
            options = key_choices(section.name, f.name)
            if options:
                with_choices += 1
                assert f"[{' | '.join(options)}]" in line, line
    assert with_choices >= 15  # arch, norm, loss kind and penalty, optimizers, precision, augment ops, metrics ...
    assert "  generator.width = 32 (default 64)" in proc.stdout and "  train.steps = 11 (default 5000)" in proc.stdout
    assert key_choices("loss", "kind") and set(key_choices("augment", "policy")) == {"translation", "cutout", "color"}
    assert key_choices("train", "steps") is None
    plain = run_train("--help", cwd=tmp_path)
    assert plain.returncode == 0 and "  train.steps = 5000  #" in plain.stdout
    assert all(name in plain.stdout for name in config_names())  # --config's help names them
    missing = run_train("--config", "nope", "--help", cwd=tmp_path)
    assert missing.returncode == 2 and "config 'nope' not found" in error_lines(missing)[0]


# ---------------------------------------------------------------- where a precision setting came from

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="mixed precision is refused only without a GPU")
ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")


def train_on_nothing(tmp_path: Path) -> tuple[str, ...]:
    """A run that fails at its precision check, before it would read data or write its run dir."""
    return "--config", "smoke", f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'no-data'}"


def accelerate_home(tmp_path: Path, precision: str | None) -> Path:
    """An HF_HOME whose accelerate default config file (the one `accelerate config` writes) asks for PRECISION."""
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    if precision:
        (home / "accelerate" / "default_config.yaml").write_text(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_machines: 1\nnum_processes: 1\n"
            f"use_cpu: true\nmixed_precision: {precision}\n")
    return home


@needs_cpu_only
def test_precision_from_the_config_key_names_the_key(tmp_path):
    proc = run_train(*train_on_nothing(tmp_path), "train.mixed_precision=fp16", cwd=tmp_path)
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and "from train.mixed_precision=fp16 (the config key) needs a GPU" in line
    assert "launch" not in line and "ACCELERATE" not in line


@needs_cpu_only
def test_precision_from_the_users_accelerate_config_file_names_that_file(tmp_path):
    home = accelerate_home(tmp_path, "fp16")
    proc = run_train(*train_on_nothing(tmp_path), cwd=tmp_path, launcher=ACCELERATE, HF_HOME=str(home))
    line = error_lines(proc)[0]
    config_file = home / "accelerate" / "default_config.yaml"
    assert f"'mixed_precision: fp16' in the accelerate config file {config_file} needs a GPU" in line, proc.stderr
    assert "Fix: set mixed_precision: 'no' there" in line and "--mixed_precision fp16" not in line
    assert not (tmp_path / "run").exists()


@needs_cpu_only
def test_precision_from_the_launch_flag_names_the_flag(tmp_path):
    home = accelerate_home(tmp_path, None)
    proc = run_train(*train_on_nothing(tmp_path), cwd=tmp_path, launcher=(*ACCELERATE, "--mixed_precision", "bf16"),
                     HF_HOME=str(home))
    line = error_lines(proc)[0]
    assert "from the --mixed_precision bf16 flag of accelerate launch needs a GPU" in line, proc.stderr
    assert "Fix: launch without --mixed_precision bf16" in line and "config file" not in line


@needs_cpu_only
def test_precision_from_the_environment_and_a_disagreeing_key_name_both(tmp_path):
    proc = run_train(*train_on_nothing(tmp_path), cwd=tmp_path, ACCELERATE_MIXED_PRECISION="fp16")
    assert "from the environment variable ACCELERATE_MIXED_PRECISION=fp16 needs a GPU" in error_lines(proc)[0]
    home = accelerate_home(tmp_path, "fp16")
    proc = run_train(*train_on_nothing(tmp_path), "train.mixed_precision=bf16", cwd=tmp_path, launcher=ACCELERATE,
                     HF_HOME=str(home))
    line = error_lines(proc)[0]
    assert f"asks for mixed precision 'fp16' ('mixed_precision: fp16' in the accelerate config file {home}" in line
    assert "but train.mixed_precision='bf16'" in line


def test_the_launch_command_line_is_read_as_accelerate_reads_it(tmp_path):
    """Without processes: which source each launch command line gives (any machine, GPU or not)."""
    home = accelerate_home(tmp_path, "fp16")
    default_file = home / "accelerate" / "default_config.yaml"
    own = tmp_path / "own.yaml"
    own.write_text("mixed_precision: fp16\n")
    script = ["-m", "distgan.train", "--config", "smoke", "--mixed_precision", "fp16"]  # the script's own args
    cases = {
        ("/venv/bin/accelerate", "launch", "--mixed_precision=fp16", *script): "flag of accelerate launch",
        ("python", "-m", "accelerate.commands.launch", "--config_file", str(own), *script): f"config file {own}",
        ("/venv/bin/accelerate", "launch", *script): f"config file {default_file}",
        ("/venv/bin/accelerate", "launch", "--cpu", *script): "environment variable",  # --cpu skips the default file
        ("torchrun", "--nproc-per-node", "2", *script): "environment variable",
    }
    # accelerate's module reads HF_HOME when first imported: run where it has not been imported yet
    code = ("import json, sys; from distgan.distributed import launcher_precision_source as s; "
            "print(json.dumps([s('fp16', argv).where for argv in json.loads(sys.argv[1])]))")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([list(c) for c in cases])], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "HF_HOME": str(home), "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    for (argv, expected), where in zip(cases.items(), json.loads(proc.stdout)):
        assert expected in where, (argv, where)
    assert "environment variable" in launcher_precision_source("fp16", []).where  # no launcher to read
