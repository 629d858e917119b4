"""``python -m distgan.prepare SOURCE --out DIR``: convert a raw dataset to webdataset shards + dataset.json.

SOURCE is one of these (readers in distgan/data/raw.py, table SOURCES):
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from distgan.cli import add_debug_flag, run_command
from distgan.console import setup_logging
from distgan.data.download import REMOTES, default_cache_dir, download
from distgan.data.errors import DataError
from distgan.data.raw import SOURCES, SPLITS, open_source
from distgan.data.shards import check_output_dir, write_shards
from distgan.limits import FLOAT_BYTES, check_images, check_resolution
from distgan.stop import stop_cleanly

log = logging.getLogger("distgan.prepare")


def describe_sources() -> str:
    """One line per SOURCES entry: its name and the first line of its reader's docstring."""
    return "\n".join(f"  {name:14s} {fmt.read.__doc__.strip().splitlines()[0]}" for name, fmt in SOURCES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distgan.prepare", description=__doc__ + describe_sources(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=list(SOURCES), help="what kind of data to read")
    parser.add_argument("--out", required=True, help="output folder for shard-*.tar and dataset.json")
    defaults = [f"{name}: {fmt.default_src}" for name, fmt in SOURCES.items() if fmt.default_src]
    cached = [name for name in REMOTES if not SOURCES[name].default_src]
    parser.add_argument("--src", help=f"input folder/archive/file ({'; '.join(defaults)}; "
                                      f"{', '.join(cached)}: ~/.cache/distgan/SOURCE)")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--limit", type=int, help="keep only the first N images")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard (default 5000)")
    parser.add_argument("--resolution", type=int, help="resize the shorter side to R and center-crop RxR")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: the source's)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it is a shard folder distgan wrote (never the source, a file or another folder)")
    parser.add_argument("--download", action="store_true",
                        help=f"fetch {', '.join(REMOTES)} from the official address into --src or the cache "
                             "(checksums verified)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(parser)
    return parser


def default_src(source: str, downloading: bool) -> Optional[Path]:
    default = SOURCES[source].default_src
    if default and not downloading:
        return Path(default)
    if source in REMOTES:
        return default_cache_dir(source)
    return None


def prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for name in ("limit", "shard_size", "resolution"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "limit" else 1):
            raise DataError(f"--{name.replace('_', '-')} {value}: must be {'0 or more' if name == 'limit' else 'positive'}")
    if args.resolution is not None:  # bounded before any image is resized to it
        check_resolution("--resolution", args.resolution)
        check_images("--resolution", args.resolution, 1, args.resolution, 3, "choose a smaller --resolution",
                     bytes_per_value=FLOAT_BYTES)
    src = Path(args.src) if args.src else default_src(args.source, args.download)
    if src is None:
        raise DataError(f"{args.source}: pass --src with the {SOURCES[args.source].src}")
    check_output_dir(args.out, args.force, protect=[src])  # before any download or read
    if args.download:
        src = download(args.source, src, progress=not args.no_progress)
    data = open_source(args.source, src, split=args.split, resolution=args.resolution,
                       channels=args.channels, limit=args.limit)
    info = write_shards(data.images, data.labels, out, classes=data.classes, source=args.source,
                        split=args.split, shard_size=args.shard_size, force=args.force, protect=[src], total=data.count,
                        progress=not args.no_progress)
    log.info("%s: %d images, %dx%d, %d channel(s), %d shards", out, info.count, info.resolution,
             info.resolution, info.channels, len(info.shards))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    # Ctrl-C and SIGTERM end it cleanly: the partial shards are removed, exit 130 / 143
    return run_command("distgan.prepare", lambda: stop_cleanly("distgan.prepare", lambda: prepare(args)),
                       debug=args.debug, args=args)


if __name__ == "__main__":
    sys.exit(main())
