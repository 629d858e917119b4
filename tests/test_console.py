"""What the commands print: log lines that clear the progress bar, no third-party INFO lines, one line per event,
a line per log.every without a bar, wandb's summary before the last lines, progress bars for evaluation and
sampling where asked for (distgan.console)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_cli
from distgan.config import DataConfig, EvalConfig
from distgan.console import PROGRESS_ENV, show_progress
from distgan.data.shards import read_dataset_info
from distgan.metrics.evaluator import Evaluator
from distgan.metrics.feature_net import train_feature_classifier

LOG_LINE = re.compile(r"\d\d:\d\d:\d\d \[rank \d+\] (?P<level>[A-Z]+) (?P<name>\S+): ")
FORCED = {PROGRESS_ENV: "1"}


def screen_lines(output: str) -> list[str]:
    """What each terminal line shows last: the text after its last carriage return (a bar redraws with \\r)."""
    return [line.rsplit("\r", 1)[-1] for line in output.split("\n")]


@pytest.fixture(scope="module")
def finished_run(fashion_shards, tmp_path_factory) -> tuple[Path, str]:
    """A complete run with its progress bar forced on and wandb offline: (run dir, stdout and stderr as written).
    An empty matplotlib cache makes matplotlib log that it builds its font list (the INFO line that used to leak)."""
    run = tmp_path_factory.mktemp("console") / "run"
    env = {**FORCED, "MPLCONFIGDIR": str(tmp_path_factory.mktemp("matplotlib"))}
    out = run_cli("distgan.train", "--config", "smoke", f"data.path={fashion_shards}", f"run.dir={run}",
                  "train.steps=6", "log.every=2", "log.sample_every=3", "checkpoint.every=3", "log.wandb=true",
                  "log.progress_bar=true", env=env, merged=True).stdout
    return run, out


@pytest.mark.timeout(120)
def test_log_lines_clear_the_bar_instead_of_landing_on_it(finished_run):
    _, out = finished_run
    assert "/6 [" in out, "the forced progress bar was drawn"
    logged = [line for line in out.split("\n") if " INFO distgan." in line]
    assert any("checkpoint" in line for line in logged), "a log line was written while the bar was up"
    on_bar = [line for line in screen_lines(out) if " INFO " in line and not LOG_LINE.match(line)]
    assert not on_bar, on_bar
    assert not re.search(r"INFO distgan\.tracking: step \d+/6", out), "with a bar there are no text lines per step"


def test_no_third_party_info_lines(finished_run):
    _, out = finished_run
    assert "font_manager" not in out
    names = {m["name"] for line in screen_lines(out) if (m := LOG_LINE.match(line)) and m["level"] == "INFO"}
    assert names and all(name.startswith("distgan") for name in names), names


def test_wandb_finishes_before_the_last_lines(finished_run):
    run, out = finished_run
    lines = screen_lines(out)
    done = next(i for i, line in enumerate(lines) if line.startswith("done: 6 steps"))
    wandb_lines = [i for i, line in enumerate(lines) if line.startswith("wandb:")]
    assert any("Run summary" in lines[i] for i in wandb_lines), "wandb printed its summary"
    assert max(wandb_lines) < done, lines[done:]
    assert [line for line in lines[done:] if line.strip()][1].startswith("see: last samples ")


@pytest.mark.timeout(120)
def test_a_stop_at_a_checkpoint_step_writes_one_checkpoint_and_text_lines_show_progress(fashion_shards, tmp_path):
    """A STOP file dated after the start is a request made during the run: the run stops at its first stop check
    (step 4), the step of a checkpoint. Without a bar, a line per log.every step."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()
    later = time.time() + 3600
    os.utime(run / "STOP", (later, later))
    proc = run_cli("distgan.train", "--config", "smoke", f"data.path={fashion_shards}", f"run.dir={run}",
                   "train.steps=1000", "log.every=2", "log.sample_every=1000", "checkpoint.every=4",
                   "train.stop_check_every=4", "log.progress_bar=false")
    assert proc.stdout.startswith("stopped at step 4 on request") and "step-00000004" in proc.stdout, proc.stdout
    checkpoint_lines = [line for line in proc.stderr.splitlines() if "INFO distgan.trainer: checkpoint " in line]
    assert len(checkpoint_lines) == 1, checkpoint_lines
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    line = r"INFO distgan\.tracking: step (\d+)/1000: loss_d \S+, loss_g \S+, \S+ images/s"
    printed = [int(step) for step in re.findall(line, proc.stderr)]
    assert printed == steps == [2, 4], proc.stderr


class TinyGenerator(nn.Module):
    z_dim = 4

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 28 * 28)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z)).view(-1, 1, 28, 28)


@pytest.mark.timeout(120)
def test_evaluation_shows_progress_on_the_main_process_when_asked(fashion_shards, tmp_path, capsys, monkeypatch):
    data = tmp_path / "shards"
    shutil.copytree(fashion_shards, data)
    train_feature_classifier(str(data), steps=2)
    evaluator = Evaluator(EvalConfig(n=60, batch=20, metrics=["fd"]), DataConfig(path=str(data), num_workers=0),
                          read_dataset_info(str(data)), torch.device("cpu"), seed=0)
    generator = TinyGenerator()
    capsys.readouterr()

    monkeypatch.setenv(PROGRESS_ENV, "1")
    evaluator.evaluate(generator, rank=1, world_size=2, gather=lambda t: t)
    assert "evaluation" not in capsys.readouterr().err, "another rank shows no bar"
    evaluator.evaluate(generator, rank=0, world_size=1, gather=lambda t: t)
    err = capsys.readouterr().err
    assert "evaluation: generating:   0%" in err and "0/60" in err, err
    assert "real features" in err and "evaluation: metrics" in err, err

    monkeypatch.setenv(PROGRESS_ENV, "0")
    evaluator.evaluate(generator, rank=0, world_size=1, gather=lambda t: t)
    assert "evaluation" not in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_sampling_shows_progress_when_asked(finished_run, tmp_path):
    run, _ = finished_run
    shown = run_cli("distgan.sample", "--run", str(run), "--n", "10", "--batch", "4", "--out", str(tmp_path / "a"),
                    env=FORCED)
    assert "generating:   0%" in shown.stderr and "0/10" in shown.stderr and "writing" in shown.stderr, shown.stderr
    plain = run_cli("distgan.sample", "--run", str(run), "--n", "10", "--out", str(tmp_path / "b"))
    assert plain.stderr == "" and plain.stdout.startswith("10 images in"), "no bar when stderr is not a terminal"


def test_bars_go_where_the_environment_says(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    assert not show_progress()
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert show_progress()
    monkeypatch.setenv("RANK", "1")
    assert not show_progress(), "forced bars stay on the main process"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(PROGRESS_ENV, "off")
    assert not show_progress()
