"""bench/augment.py --dry-run: the benchmark's whole path (data, classifier, three variants, evaluation, table)."""
from __future__ import annotations

import json
import math

from conftest import load_bench_script, require_fashion_mnist


def test_dry_run_trains_every_variant_and_prints_the_table(tmp_path, capsys):
    require_fashion_mnist()
    bench = load_bench_script("augment")
    assert bench.main(["--dry-run", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    runs = {r["variant"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    assert runs.keys() == bench.VARIANTS.keys()
    assert all(math.isfinite(r["fd"]) and r["images"] == 16 for r in runs.values())
    assert (runs["none"]["augment_p"], runs["diffaugment"]["augment_p"]) == (None, 1.0)
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {name}" for name in bench.VARIANTS]
