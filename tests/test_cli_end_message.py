"""What ``python -m distgan.train`` prints when it finishes: where to look, and how the run is scored."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from distgan.metrics.cache import find_classifier
from distgan.metrics.feature_net import train_feature_classifier
from distgan.metrics.features import CLASSIFIER_FILE
from distgan.tracking import final_figures

SMOKE = ("train.steps=4", "log.every=2", "log.sample_every=2", "checkpoint.every=2")


def end_lines(stdout: str) -> list[str]:
    """The lines from the 'done: ...' line on."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("done: "))
    return lines[start:]


def printed_paths(lines: list[str], run: Path) -> list[Path]:
    """Every path in ``lines`` inside the run dir (words that start with it)."""
    return [Path(word.rstrip(";,")) for line in lines for word in line.split() if word.startswith(str(run))]


def assert_where_to_look(lines: list[str], run: Path) -> None:
    """The second line names the last G_ema grid, the GIF and the plots folder, and every path printed exists."""
    assert lines[1].startswith("see: last samples "), lines
    paths = printed_paths(lines, run)
    assert sorted((run / "samples").glob("g_ema-step-*.png"))[-1] in paths
    assert {run / "progress.gif", run / "plots"} <= set(paths)
    assert all(path.exists() for path in paths), [p for p in paths if not p.exists()]
    assert len(lines) <= 4


@pytest.mark.timeout(120)
def test_end_message_says_where_to_look_and_how_to_score(fashion_shards, tmp_path, monkeypatch):
    """With a feature classifier for the data and no end-of-run evaluation: the one command that scores it."""
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))  # a classifier for this test's copy alone
    data = tmp_path / "shards"
    shutil.copytree(fashion_shards, data)
    train_feature_classifier(str(data), steps=2)
    assert find_classifier(data) is not None and not (data / CLASSIFIER_FILE).exists()
    run = tmp_path / "run"
    out = run_cli("distgan.train", "--config", "smoke", f"data.path={data}", f"run.dir={run}", *SMOKE).stdout

    lines = end_lines(out)
    assert lines[0].startswith("done: 4 steps") and len(lines) == 3, lines
    assert_where_to_look(lines, run)
    assert lines[2] == f"score it: python -m distgan.eval --run {run}"


@pytest.mark.timeout(120)
def test_end_message_without_a_classifier(fashion_shards, tmp_path, monkeypatch):
    """No classifier for the data and no evaluation: where to look, nothing more."""
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))  # whatever other tests trained for these shards
    assert find_classifier(fashion_shards) is None
    run = tmp_path / "run"
    lines = end_lines(run_cli("distgan.train", "--config", "smoke", f"data.path={fashion_shards}", f"run.dir={run}",
                              *SMOKE).stdout)
    assert len(lines) == 2, lines
    assert_where_to_look(lines, run)


def test_final_figures_name_fd_modes_and_class_agreement():
    figures = {"fd": 15.98841, "modes_covered": 10.0, "kl_to_real": 0.01, "class_agreement": 0.926}
    assert final_figures(figures, [str(k) for k in range(10)]) == "fd 15.99, modes covered 10 of 10, class agreement 0.926"
    assert final_figures({"kid": 0.5}, None) == "kid 0.5"
