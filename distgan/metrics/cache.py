"""Where evaluation keeps what it derives from a data set (the feature classifier, real statistics): a folder of
distgan's own, never the user's data folder.

``data_cache(path)`` is ``$DISTGAN_CACHE`` (else ``$XDG_CACHE_HOME/distgan``, else ``~/.cache/distgan``)
``/data/<key>/``, where the key is a SHA-256 of the data set's identity: its dataset.json, and each shard's name,
size and first bytes. A copy or a move of the data finds the same folder; prepared again (new shards) it gets a
new one. A classifier kept beside the shards by an older distgan (or put there by hand) is still read, first.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from distgan.data.errors import DataError
from distgan.data.shards import DATASET_JSON
from distgan.metrics.features import CLASSIFIER_FILE

CACHE_ENV = "DISTGAN_CACHE"
HEAD_BYTES = 1 << 16  # of each shard, hashed: sizes alone would not tell apart two sets of equal-size .npy records


def cache_root() -> Path:
    """distgan's cache folder: $DISTGAN_CACHE, else $XDG_CACHE_HOME/distgan, else ~/.cache/distgan."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "distgan"


def dataset_key(path: str | os.PathLike) -> Optional[str]:
    """The SHA-256 of a data set's identity (its dataset.json, and each shard's name, size and first 64 KiB); None
    for what is not a local folder of shards (a shard list, a URL): nothing is cached for it."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    shards = sorted(p for p in folder.iterdir() if p.name.endswith((".tar", ".tar.gz")) and p.is_file())
    record = folder / DATASET_JSON
    if not shards and not record.is_file():
        return None
    sha = hashlib.sha256(record.read_bytes() if record.is_file() else b"")
    for shard in shards:
        sha.update(f"\n{shard.name}:{shard.stat().st_size}:".encode())
        with open(shard, "rb") as fh:
            sha.update(fh.read(HEAD_BYTES))
    return sha.hexdigest()


def data_cache(path: str | os.PathLike) -> Optional[Path]:
    """The cache folder of the data set at ``path`` (not created here); None when it has no identity (see
    ``dataset_key``): nothing is then cached."""
    key = dataset_key(path)
    return cache_root() / "data" / key if key else None


def find_classifier(path: str | os.PathLike) -> Optional[Path]:
    """The feature classifier of the data set at ``path``: beside the shards when one is there (an older
    distgan's place, or one put there by hand), else in its cache folder when trained; None when neither."""
    beside = Path(path) / CLASSIFIER_FILE
    if os.path.isdir(path) and beside.is_file():
        return beside
    cached = data_cache(path)
    return cached / CLASSIFIER_FILE if cached is not None and (cached / CLASSIFIER_FILE).is_file() else None


def classifier_target(path: str | os.PathLike) -> Path:
    """Where a feature classifier trained on the data set at ``path`` is saved: its cache folder."""
    cached = data_cache(path)
    if cached is None:
        raise DataError(f"--data {path}: no shards there; train-features needs a folder written by "
                        "python -m distgan.prepare")
    return cached / CLASSIFIER_FILE
