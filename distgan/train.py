"""``python -m distgan.train --config NAME_OR_PATH [--resume auto|PATH] [--print-config] [section.key=value ...]``

The same command runs under ``accelerate launch`` for any number of processes.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from distgan import console
from distgan.cli import add_debug_flag, run_command
from distgan.config import Config, ConfigError, config_names, describe, dump_yaml, load_config


def build_parser(described: Optional[Config] = None,
                 described_as: str = "the schema's defaults") -> argparse.ArgumentParser:
    """The command's parser; ``--help`` lists every key with its value in ``described`` (``described_as``)."""
    parser = argparse.ArgumentParser(
        prog="python -m distgan.train",
        description=f"Train a GAN. Config keys with the values of {described_as} (override any with "
                    "section.key=value):\n\n" + describe(described),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="NAME_OR_PATH",
                        help="a YAML file, or the name of a config shipped with distgan: " + ", ".join(config_names()))
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto' (latest intact checkpoint in run.dir, or a fresh start) or a checkpoint path")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, overrides applied) and exit without training")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=1000 run.dir=runs/a")
    return parser
from distgan.stop import Interrupted, exit_status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if "-h" in argv or "--help" in argv:  # describe the config named on the command line, overrides applied
        named = argparse.ArgumentParser(add_help=False)
        named.add_argument("--config")
        config = named.parse_known_args(argv)[0].config
        if config:
            overrides = [a for a in argv if "=" in a and not a.startswith("-")]
            try:
                parser = build_parser(load_config(config, overrides), " ".join([f"--config {config}", *overrides]))
            except ConfigError as err:
                parser.error(str(err))
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    if not args.config:
        parser.error("pass --config NAME_OR_PATH: a YAML file or one of distgan's configs "
                     f"({', '.join(config_names())})")
    return args


def setup_logging() -> None:
    """Log lines with the process's rank, through the progress bar (distgan.console)."""
    console.setup_logging(rank=os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    return run_command("distgan.train", lambda: train(args), debug=args.debug, args=args)


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    from distgan.api import fit  # torch and accelerate load only after the config is valid
    from distgan.trainer import NonFiniteError

    try:
        fit(cfg, resume=args.resume)
    except NonFiniteError as err:  # the run diverged: not the user's typo, but not a bug either
        print(f"distgan.train: error: {err}", file=sys.stderr)
        return 3
    except Interrupted:  # Ctrl-C: training stopped after the step, with a checkpoint (SIGTERM/SIGUSR1 exit 0)
        print(f"distgan.train: stopped on Ctrl-C after a checkpoint; --resume auto continues ({cfg.run.dir})",
              file=sys.stderr)
        return exit_status(signal.SIGINT)
    except KeyboardInterrupt:  # a second Ctrl-C, or one while starting
        print(f"distgan.train: interrupted: stopped at once, without a checkpoint; --resume auto continues from the "
              f"last one in {cfg.run.dir}/checkpoints", file=sys.stderr)
        return exit_status(signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
