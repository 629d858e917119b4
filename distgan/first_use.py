"""First use of a config on a fresh machine: make ``data.path`` from ``data.prepare`` when it holds no shards.

The source's local copy is used when installed (Fashion-MNIST's Debian package), else its official files
are downloaded into the cache with their checksums verified (distgan.data.download), then distgan.prepare
writes the shards, exactly as ``python -m distgan.prepare SOURCE --out data.path [--download]`` would.
"""
from __future__ import annotations

import logging
from pathlib import Path

from distgan.config import DataConfig, ConfigError
from distgan.data.download import REMOTES
from distgan.data.raw import SOURCES

log = logging.getLogger(__name__)


def needs_preparing(data: DataConfig) -> bool:
    return bool(data.prepare) and not (Path(data.path) / "dataset.json").is_file()


def prepare_command(data: DataConfig) -> list[str]:
    """The distgan.prepare arguments that make ``data.path`` from ``data.prepare``."""
    source = data.prepare
    if source not in SOURCES:
        raise ConfigError(f"data.prepare = {source!r}: not a distgan.prepare source (one of {', '.join(SOURCES)})")
    local = SOURCES[source].default_src
    if local and Path(local).exists():
        return [source, "--out", data.path]
    if source in REMOTES:
        return [source, "--out", data.path, "--download"]
    raise ConfigError(f"data.prepare = {source!r} needs its input files (--src): run python -m distgan.prepare "
                      f"{source} --src PATH --out {data.path} once, or unset data.prepare")


def prepare_if_missing(data: DataConfig) -> None:
    """Make ``data.path`` from ``data.prepare`` unless its shards are there (call on one process; the others wait)."""
    if needs_preparing(data):
        prepare_data(data)


def prepare_data(data: DataConfig) -> None:
    """Write the shards of ``data.path`` (call on one process; the others wait for it)."""
    from distgan.prepare import build_parser, prepare

    argv = prepare_command(data)
    log.info("%s holds no shards: preparing them on first use (python -m distgan.prepare %s)", data.path,
             " ".join(argv))
    prepare(build_parser().parse_args(argv + ["--no-progress"]))
