"""bench/throughput.py on the smoke config for a few steps: the benchmark's own code (the real Trainer at the
config's log cadence, the plain loop, the ratio) runs end to end, so it has not rotted. Not a timed test."""
from __future__ import annotations

import re

import pytest

from conftest import load_bench_script


@pytest.mark.timeout(240)
def test_throughput_benchmark_runs_both_loops_and_prints_the_ratio(fashion_shards, capsys):
    bench = load_bench_script("throughput")
    bench.main(["--config", "smoke", "--steps", "8", "--rounds", "1", f"data.path={fashion_shards}"])
    out = capsys.readouterr().out
    found = re.search(r"distgan ([0-9.]+) img/s, plain PyTorch loop ([0-9.]+) img/s, ratio ([0-9.]+)", out)
    assert found, out
    ours, plain, ratio = map(float, found.groups())
    assert ours > 0 and plain > 0 and ratio == pytest.approx(ours / plain, abs=0.01)


def test_the_trainer_runs_at_the_configs_log_cadence(fashion_shards, monkeypatch):
    """Logging every 3 steps made distgan pay a log line per 3 steps that a real run pays per 50."""
    bench = load_bench_script("throughput")
    from distgan.config import load_config

    seen = {}

    class Spy(bench.Trainer):
        def __init__(self, cfg, *a, **k):
            seen.update(every=cfg.log.every, steps=cfg.train.steps)
            super().__init__(cfg, *a, **k)

    monkeypatch.setattr(bench, "Trainer", Spy)
    cfg = load_config("smoke", [f"data.path={fashion_shards}", "log.every=4"])
    assert bench.distgan_loop(cfg, 10) > 0
    assert seen == {"every": 4, "steps": 4 + 12}  # a warm-up window, then whole windows covering 10 steps
