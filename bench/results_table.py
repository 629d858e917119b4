"""Evaluate finished runs and print one Markdown table row per run.

    python bench/results_table.py RUN_DIR [RUN_DIR ...] [--n 10000]

Each run is evaluated with ``python -m distgan.eval --run DIR`` (the feature classifier beside its shards,
the test split beside them for Parzen); wall time comes from the run's metrics.jsonl and timestamps.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

COLUMNS = ("fd", "kid", "precision", "recall", "modes_covered", "kl_to_real", "parzen_ll")


def evaluate(run: Path, n: int) -> dict:
    eval_file = run / "eval.json"
    if not eval_file.is_file():
        subprocess.run([sys.executable, "-m", "distgan.eval", "--run", str(run), "--n", str(n)], check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads(eval_file.read_text())


def wall_seconds(run: Path) -> float:
    """Training wall time: from config.yaml (written at the start) to the export (written at the end)."""
    return (run / "generator_ema.safetensors").stat().st_mtime - (run / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=10000)
    args = parser.parse_args()
    print("| run | images seen | " + " | ".join(COLUMNS) + " | parzen se | wall s |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    reference = None
    for run in args.runs:
        figures = evaluate(run, args.n)
        reference = figures.get("reference") or reference
        images = max(json.loads(l).get("images_seen", 0) for l in (run / "metrics.jsonl").read_text().splitlines())
        cells = [f"{figures[c]:.4g}" for c in COLUMNS]
        print(f"| {run.name} | {images} | " + " | ".join(cells) + f" | {figures['parzen_se']:.3g} | "
              f"{wall_seconds(run):.0f} |")
    if reference:
        print("| real vs real (train vs test) | - | " + " | ".join(f"{reference[c]:.4g}" for c in COLUMNS)
              + f" | {reference['parzen_se']:.3g} | - |")


if __name__ == "__main__":
    main()
