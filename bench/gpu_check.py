"""The steps of bench/gpu_check.sh that need Python: each prints Markdown lines for the report.

    python bench/gpu_check.py env
    python bench/gpu_check.py shards OUT --count N          # synthetic CIFAR-shaped shards (32x32x3, 10 classes)
    python bench/gpu_check.py loader DATA --batch B --workers W --seconds S
    python bench/gpu_check.py sync DATA --precision P [--penalty r1] --steps N [--dry-run]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this working tree's distgan, not an installed one

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distgan.config import load_config  # noqa: E402
from distgan.data.shards import write_shards  # noqa: E402
from distgan.data.stream import ShardSource  # noqa: E402

DRY_RUN_MODEL = ["generator.width=8", "generator.max_width=32", "discriminator.width=8", "discriminator.max_width=32"]


def env(_: argparse.Namespace) -> None:
    import accelerate

    cuda = torch.cuda.is_available()
    print(f"- python {platform.python_version()}, torch {torch.__version__}, accelerate {accelerate.__version__}, "
          f"CUDA {torch.version.cuda or 'none'}, cuDNN {torch.backends.cudnn.version() if cuda else 'none'}")
    print(f"- host {platform.node()}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
              f"bf16 {'yes' if p.major >= 8 else 'no'}")
    if not cuda:
        print("- no CUDA device: figures below are CPU figures (a dry run checks the code, it measures nothing)")


def shards(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.count, 32, 32, 3), dtype=np.uint8)
    start = time.perf_counter()
    write_shards(images, rng.integers(0, 10, args.count), args.out, classes=[f"c{k}" for k in range(10)],
                 source="synthetic", shard_size=max(1, args.count // 8), progress=False)
    print(f"- {args.count:,} synthetic 32x32x3 images in 8 shards, written in {time.perf_counter() - start:.1f} s")


def loader(args: argparse.Namespace) -> None:
    cfg = load_config("cifar10", [f"data.path={args.data}", "data.prepare=none", f"data.num_workers={args.workers}"])
    stream = ShardSource(cfg.data, raw=torch.cuda.is_available()).batches(args.batch, 0, 1, 0, 0)
    next(stream)  # workers started
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        images += len(next(stream)[0])
    stream.close()
    print(f"- loader: {images / (time.perf_counter() - start):,.0f} images/s "
          f"(batch {args.batch}, {args.workers} workers, one process)")


def sync(args: argparse.Namespace) -> None:
    """``args.steps`` training steps with CUDA's sync debug mode at "error": any host sync inside a step raises."""
    from distgan.trainer import Trainer

    cuda = torch.cuda.is_available()
    if args.precision != "no" and not cuda:
        print(f"| {args.precision}{' + ' + args.penalty if args.penalty != 'none' else ''} | skipped: needs a GPU |")
        return
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"run.dir={run_dir}", f"data.path={args.data}", "data.prepare=none", "log.wandb=false",
                     "log.progress_bar=false", f"train.mixed_precision={args.precision}", f"loss.penalty={args.penalty}",
                     "data.num_workers=1", *(DRY_RUN_MODEL + ["train.batch_size=8"] if args.dry_run else [])]
        trainer = Trainer(load_config("cifar10", overrides))
        data, window = trainer.data_stream(), {}
        trainer.train_step(data, window)  # first step: lazy state (Adam, cuDNN autotuning) may sync
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(args.steps):
                trainer.train_step(data, window)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            data.close()
            trainer.lock.release()
        trainer.check_health()
    mode = 'sync debug mode "error"' if cuda else "CPU: no sync debug mode, the steps ran"
    print(f"| {args.precision}{' + ' + args.penalty if args.penalty != 'none' else ''} | {args.steps} steps, "
          f"no host sync ({mode}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("env")
    p = sub.add_parser("shards")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=50_000)
    p = sub.add_parser("loader")
    p.add_argument("data")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p = sub.add_parser("sync")
    p.add_argument("data")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--penalty", choices=["none", "r1"], default="none")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    {"env": env, "shards": shards, "loader": loader, "sync": sync}[args.step](args)


if __name__ == "__main__":
    main()
