"""``python -m distgan.train --config NAME_OR_PATH [--resume auto|PATH] [section.key=value ...]``

The same command runs under ``accelerate launch`` for any number of processes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from distgan.cli import add_debug_flag, run_command
from distgan.config import describe, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distgan.train",
        description="Train a GAN. Config keys (override any with section.key=value):\n\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML file, or a name in configs/ (e.g. fashion_mnist)")
    parser.add_argument("--resume", help="'auto' (latest intact checkpoint in run.dir, or a fresh start) or a "
                                         "checkpoint path")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=1000 run.dir=runs/a")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the flags


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("accelerate", "wandb", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("distgan.train", lambda: train(args), debug=args.debug)


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from distgan.api import fit  # accelerate loads only after the config is valid
    from distgan.trainer import NonFiniteError

    try:
        fit(cfg, resume=args.resume)
    except NonFiniteError as err:  # the run diverged: not the user's typo, but not a bug either
        print(f"distgan.train: error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
