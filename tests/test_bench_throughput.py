"""bench/throughput.py on the smoke config for a few steps: the benchmark's own code (the real Trainer at the
config's log cadence, the plain loop, the ratio) runs end to end, so it has not rotted. Not a timed test."""
from __future__ import annotations

import re

import pytest

from conftest import load_bench_script


@pytest.mark.timeout(240)
def test_throughput_benchmark_runs_both_loops_at_the_configs_log_cadence(fashion_shards, capsys, monkeypatch):
    bench = load_bench_script("throughput")
    seen = []

    class Spy(bench.Trainer):
        def __init__(self, cfg, *args, **kwargs):
            seen.append((cfg.log.every, cfg.train.steps))
            super().__init__(cfg, *args, **kwargs)

    monkeypatch.setattr(bench, "Trainer", Spy)
    bench.main(["--config", "smoke", "--steps", "10", "--rounds", "1", f"data.path={fashion_shards}", "log.every=4"])
    # logging every 3 steps made distgan pay a log line per 3 steps that a real run pays per log.every
    assert seen == [(4, 4 + 12)]  # the config's cadence: a warm-up window, then whole windows covering 10 steps
    out = capsys.readouterr().out
    found = re.search(r"distgan ([0-9.]+) img/s, plain PyTorch loop ([0-9.]+) img/s, ratio ([0-9.]+)", out)
    assert found, out
    ours, plain, ratio = map(float, found.groups())
    assert ours > 0 and plain > 0
    # figures printed as whole img/s and the ratio to 2 decimals: the ratio lies within those roundings
    assert (ours - 0.5) / (plain + 0.5) - 0.005 <= ratio <= (ours + 0.5) / (plain - 0.5) + 0.005
