"""The results table of BENCHMARKS.md is generated from the committed raw outputs, never edited by hand.

bench/results.py --table-only rebuilds the block between the markers from bench/results/ alone (no torch,
no data, no training); a hand edit of the table, or raw outputs committed without the table, fails here.
"""
from __future__ import annotations

import json
import shutil

from conftest import load_bench_script


def load_bench():
    return load_bench_script("results")


def test_table_in_benchmarks_md_is_the_generated_one():
    bench = load_bench()
    expected = bench.render_table(bench.RESULTS)
    assert bench.read_block(bench.MARKDOWN) == expected, (
        "the results table in BENCHMARKS.md is not the one bench/results/ gives: "
        "run python bench/results.py --table-only (never edit the table by hand)")


def test_every_committed_run_is_in_the_table_and_missing_ones_are_named(tmp_path):
    bench = load_bench()
    block = bench.read_block(bench.MARKDOWN)
    for run in bench.RUNS:
        folder = bench.RESULTS / run.name
        row = next(line for line in block.splitlines() if line.startswith(f"| {run.label} |"))
        if (folder / "eval.json").is_file():
            fd = json.loads((folder / "eval.json").read_text())["fd"]
            assert f"{fd:.4g}" in row and "not yet measured" not in row
            record = json.loads((folder / "run.json").read_text())
            assert all((folder / name).is_file() for name in record["files"].values())
            assert record["overrides"] == list(run.overrides)
        else:
            assert "not yet measured" in row

    # with no raw outputs at all, every run is listed as not yet measured
    empty = bench.render_table(tmp_path)
    assert all(f"| {run.label} |" in empty for run in bench.RUNS)
    assert empty.count("not yet measured |") == len(bench.RUNS)


def test_a_hand_edit_is_caught(tmp_path):
    bench = load_bench()
    copy = tmp_path / "BENCHMARKS.md"
    shutil.copy(bench.MARKDOWN, copy)
    bench.write_block(bench.render_table(bench.RESULTS), copy)
    assert bench.read_block(copy) == bench.render_table(bench.RESULTS)
    copy.write_text(copy.read_text().replace("| R1 |", "| R1 (best) |"))
    assert bench.read_block(copy) != bench.render_table(bench.RESULTS)
