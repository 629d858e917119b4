"""``python -m distgan.eval --run RUN --all-checkpoints`` on a real short run: every checkpoint scored once,
the table and the plot, only new checkpoints scored on the next call, a damaged one skipped and named."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import prepare_fashion_mnist, run_cli
from distgan.checkpoint_scores import PLOT_FILE, RESULTS_DIR, RESULTS_FILE, TABLE_FILE
from distgan.eval import main as eval_main
from distgan.metrics.feature_net import train_feature_classifier

RUN_OVERRIDES = ("log.wandb=false", "eval.metrics=[fd]", "eval.every=10", "eval.n=100", "eval.best_metric=fd")
SCORE = ("--n", "200", "--metrics", "fd", "kid", "dc", "classes_covered")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """1,000 train images in 2 shards, 300 test images beside them, and their feature classifier."""
    fm = prepare_fashion_mnist(tmp_path_factory.mktemp("ckpt_data"), train=1000, test=300)
    train_feature_classifier(str(fm), steps=100)
    return fm


def train(data: Path, run: Path, steps: int, *extra: str) -> None:
    run_cli("distgan.train", "--config", "smoke", f"data.path={data}", f"run.dir={run}", f"train.steps={steps}",
            *RUN_OVERRIDES, *extra)


def score(capsys, run: Path, *extra: str) -> dict:
    code = eval_main(["--run", str(run), "--all-checkpoints", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / RESULTS_DIR / RESULTS_FILE).read_text().splitlines()]


@pytest.mark.timeout(300)
def test_every_checkpoint_is_scored_once_with_a_table_a_plot_and_the_best(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(data, run, 20)  # checkpoints step-10 and step-20 (checkpoint.every=10, keep=2) and best/
    first = score(capsys, run, *SCORE)
    steps = [c["step"] for c in first["checkpoints"]]
    assert steps == [10, 20] and first["scored"] == 2 and first["cached"] == 0 and first["skipped"] == []
    names = [n for c in first["checkpoints"] for n in c["checkpoints"]]
    assert names[:1] == ["step-00000010"] and "step-00000020" in names and any(n.startswith("best/") for n in names)
    for row in first["checkpoints"]:  # every figure asked for, finite
        assert all(np.isfinite(row[k]) for k in ("fd", "kid_x1e3", "density", "coverage", "modes_covered"))
    best = min(first["checkpoints"], key=lambda c: c["fd"])
    assert first["best"] == {"step": best["step"], "checkpoints": best["checkpoints"], "metric": "fd",
                             "value": best["fd"]}
    assert first["reference"]["fd"] < min(c["fd"] for c in first["checkpoints"])  # real vs real: the floor
    table = (run / RESULTS_DIR / TABLE_FILE).read_text()
    assert f"| **{best['step']}** (best) |" in table and "| real vs real |" in table and "KID x1e3" in table
    assert table.count("| step-00000010") == 1 and "Best by fd (lower is better)" in table
    with Image.open(run / RESULTS_DIR / PLOT_FILE) as image:
        assert image.format == "PNG" and np.asarray(image.convert("L"), dtype=np.float32).std() > 5
    assert len(records(run)) == 2

    results = run / RESULTS_DIR / RESULTS_FILE
    before = (results.stat().st_mtime_ns, results.read_bytes())
    second = score(capsys, run, *SCORE)  # nothing new: every figure from the results file
    assert second["scored"] == 0 and second["cached"] == 2
    assert (results.stat().st_mtime_ns, results.read_bytes()) == before
    assert second["checkpoints"] == first["checkpoints"] and second["best"] == first["best"]

    other = score(capsys, run, "--n", "100", "--metrics", "fd")  # other settings: scored anew, kept apart
    assert other["scored"] == 2 and len(records(run)) == 4
    assert [c["fd"] for c in other["checkpoints"]] != [c["fd"] for c in first["checkpoints"]]

    train(data, run, 30, "--resume", "auto")  # step-30 written, step-10 removed (keep=2)
    third = score(capsys, run, *SCORE)
    assert third["scored"] == 1 and third["cached"] == 1
    assert [(c["step"], c["checkpoints"]) for c in third["checkpoints"]][0] == (10, [])  # removed, still plotted
    assert [c["step"] for c in third["checkpoints"]] == [10, 20, 30]
    assert third["checkpoints"][1]["fd"] == first["checkpoints"][1]["fd"]
    assert "(removed since scored)" in (run / RESULTS_DIR / TABLE_FILE).read_text()

    damaged = run / "checkpoints" / "step-00000030" / "G_ema.safetensors"
    payload = bytearray(damaged.read_bytes())
    payload[-1] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    fourth = score(capsys, run, *SCORE)
    assert fourth["scored"] == 0 and "step-00000030" not in [n for c in fourth["checkpoints"] for n in c["checkpoints"]]
    assert len(fourth["skipped"]) == 1 and fourth["skipped"][0]["checkpoint"].endswith("step-00000030")
    assert "SHA-256" in fourth["skipped"][0]["problem"]
    assert "Skipped (damaged): step-00000030" in (run / RESULTS_DIR / TABLE_FILE).read_text()


def test_all_checkpoints_needs_a_run_with_checkpoints(tmp_path, capsys):
    assert eval_main(["--export", str(tmp_path / "g.safetensors"), "--data", str(tmp_path), "--all-checkpoints"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--all-checkpoints goes with --run DIR" in err[0]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(f"data: {{path: {tmp_path}}}\n")
    assert eval_main(["--run", str(run), "--all-checkpoints"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint to score" in err[0]
