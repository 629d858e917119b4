"""Differentiable augmentation on a small data set: Frechet distance with and without it, at equal images.

    python bench/augment.py [--work runs/bench-augment] [--seeds 0 1 2] [--steps 3000] [--subset 2000] [--n 5000]
    python bench/augment.py --dry-run        # tiny data, 2 steps: the whole path end to end, no figure worth keeping

Trains the config (default fashion_mnist) on a SUBSET-image slice of Fashion-MNIST (distgan.prepare --limit: a
class-mixed subset) for each seed and each variant: no augmentation, DiffAugment (p = 1) and adaptive p (ADA,
from p = 0). Every run sees the same number of images. G_ema is then scored (distgan.eval, fd with distgan's
feature classifier) against the FULL training split: a D that memorised the subset shows there. Prints each
figure as it comes, then a Markdown table for BENCHMARKS.md. Runs resume (--resume auto); finished ones are
skipped, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this working tree's distgan, not an installed one

from distgan import eval as distgan_eval, prepare, train  # noqa: E402
from distgan.metrics.cache import find_classifier  # noqa: E402
from distgan.tracking import read_metrics  # noqa: E402

VARIANTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "diffaugment": ("augment.policy=[translation,cutout,color]", "augment.p=1"),
    "adaptive": ("augment.policy=[translation,cutout,color]", "augment.p=0", "augment.adaptive=true"),
}
DRY = {"full": 300, "subset": 100, "steps": 2, "n": 100, "classifier_steps": 5, "seeds": [0]}
DRY_OVERRIDES = ("generator.width=8", "discriminator.width=8", "train.batch_size=8", "log.every=1",
                 "log.sample_every=1", "log.n_samples=4", "log.gif=false", "data.num_workers=0")


def quiet_call(main, argv: list[str]) -> str:
    """Run a distgan command in this process; its stdout (the JSON answer) is returned, a failure ends the script."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"{main.__module__} {' '.join(argv)} exited {code}")
    return out.getvalue()


def prepare_data(work: Path, subset: int, full_limit: Optional[int], classifier_steps: Optional[int]) -> tuple[Path, Path]:
    """The full training split (with its feature classifier, tested on the test split) and the
    SUBSET-image training slice."""
    full, small = work / "data" / "fashion_mnist", work / "data" / f"fashion_mnist_{subset}"
    limit = ["--limit", str(full_limit)] if full_limit else []
    for out, extra in ((full, limit), (work / "data" / "fashion_mnist_test", ["--split", "test", *limit]),
                       (small, ["--limit", str(subset)])):
        if not (out / "dataset.json").is_file():
            quiet_call(prepare.main, ["fashion-mnist", "--out", str(out), "--no-progress", *extra])
    if find_classifier(full) is None:
        steps = ["--steps", str(classifier_steps)] if classifier_steps else []
        quiet_call(distgan_eval.main, ["train-features", "--data", str(full), *steps])
    return full, small


def train_and_score(run_dir: Path, config: str, data: Path, full: Path, seed: int, steps: int, n: int,
                    overrides: tuple[str, ...]) -> dict:
    """Train one run (resumed or skipped when done), then its G_ema's fd against the full split."""
    if not (run_dir / "generator_ema.safetensors").is_file():
        quiet_call(train.main, ["--config", config, f"run.dir={run_dir}", f"data.path={data}", f"run.seed={seed}",
                                f"train.steps={steps}", "log.wandb=false", "log.progress_bar=false", *overrides,
                                "--resume", "auto"])
    result = json.loads(quiet_call(distgan_eval.main, [
        "--export", str(run_dir / "generator_ema.safetensors"), "--data", str(full), "--metrics", "fd",
        "--n", str(n), "--seed", "0"]).strip().splitlines()[-1])
    last = read_metrics(run_dir / "metrics.jsonl")[-1]  # a torn tail skipped, not a crash
    return {"fd": result["fd"], "augment_p": last.get("augment_p"), "images": last["images_seen"]}


def table(results: dict[str, list[dict]], command: str) -> str:
    lines = [f"`{command}`", "", "| variant | augment overrides | fd per seed (lower is better) | mean ± sd | final p |",
             "|---|---|---|---|---|"]
    for name, runs in results.items():
        fds = [r["fd"] for r in runs]
        spread = f"{statistics.mean(fds):.2f} ± {statistics.stdev(fds):.2f}" if len(fds) > 1 else f"{fds[0]:.2f}"
        p = runs[-1]["augment_p"]
        lines.append(f"| {name} | {' '.join(VARIANTS[name]) or '-'} | {', '.join(f'{x:.2f}' for x in fds)} | {spread} "
                     f"| {'-' if p is None else f'{p:.3f}'} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-augment"))
    parser.add_argument("--config", default="fashion_mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000, help="generator steps of every run (equal images)")
    parser.add_argument("--subset", type=int, default=2000, help="training images")
    parser.add_argument("--n", type=int, default=5000, help="generated images per evaluation")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--dry-run", action="store_true", help="tiny data and 2 steps: the path, not a figure")
    args = parser.parse_args(argv)
    extra: tuple[str, ...] = ()
    full_limit = classifier_steps = None
    if args.dry_run:
        args.subset, args.steps, args.n, args.seeds = DRY["subset"], DRY["steps"], DRY["n"], DRY["seeds"]
        full_limit, classifier_steps, extra = DRY["full"], DRY["classifier_steps"], DRY_OVERRIDES
    full, small = prepare_data(args.work, args.subset, full_limit, classifier_steps)
    results: dict[str, list[dict]] = {}
    for name in args.variants:
        for seed in args.seeds:
            run = train_and_score(args.work / f"{name}-seed{seed}", args.config, small, full, seed, args.steps, args.n,
                                  (*extra, *VARIANTS[name]))
            results.setdefault(name, []).append(run)
            print(json.dumps({"variant": name, "seed": seed, **run}), flush=True)
    command = "python bench/augment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
