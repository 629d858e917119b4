"""Fetch Fashion-MNIST, MNIST or CIFAR-10 from their official addresses and verify the official checksums.

The base URL can be replaced (a mirror, or a local server in tests) with the ``mirror`` argument or the
DISTGAN_DOWNLOAD_MIRROR environment variable; file names and checksums stay the same.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from tqdm import tqdm

from distgan.data.errors import DataError

log = logging.getLogger(__name__)

MIRROR_ENV = "DISTGAN_DOWNLOAD_MIRROR"
URL_SCHEMES = ("http", "https", "ftp", "file")  # what urllib.request opens
CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """Where a dataset's files live and their official MD5 checksums."""

    base_url: str
    md5: dict[str, str]


REMOTES: dict[str, Remote] = {
    "fashion-mnist": Remote(  # github.com/zalandoresearch/fashion-mnist README
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
         "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
         "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
         "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "mnist": Remote(  # yann.lecun.com refuses scripted downloads; this is the mirror PyTorch uses
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
         "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
         "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
         "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "cifar10": Remote(  # www.cs.toronto.edu/~kriz/cifar.html
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
}


def default_cache_dir(source: str) -> Path:
    """$XDG_CACHE_HOME/distgan/SOURCE, or ~/.cache/distgan/SOURCE."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distgan" / source


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # the official checksums are MD5: integrity, not security
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_file(url: str, dest: Path, md5: str, *, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to a temporary file beside ``dest``, check its MD5, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, desc=dest.name, unit="B", unit_scale=True, file=sys.stderr,
                      disable=not progress) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: MD5 {digest.hexdigest()} differs from the official {md5}: the download is "
                            f"corrupt or the server sent another file; nothing was saved, try again (or another {MIRROR_ENV})")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a URL urllib cannot parse
        raise DataError(f"cannot download {url}: {err} (no network? put the files in the --src folder instead)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def download(source: str, dest: Optional[str | Path] = None, *, mirror: Optional[str] = None,
             timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch every file of ``source`` into ``dest`` (default: the cache folder) and return that folder.

    Files already there with the right checksum are kept; a file with a wrong checksum is fetched again.
    """
    if source not in REMOTES:
        raise DataError(f"--download: no official address for {source!r}; it works for {', '.join(REMOTES)}")
    remote = REMOTES[source]
    folder = Path(dest) if dest is not None else default_cache_dir(source)
    base = mirror or os.environ.get(MIRROR_ENV) or remote.base_url
    if urlparse(base).scheme not in URL_SCHEMES or not (urlparse(base).netloc or urlparse(base).scheme == "file"):
        where = "mirror" if mirror else MIRROR_ENV
        raise DataError(f"{where}={base!r} is not a URL; give the folder's address, e.g. https://HOST/PATH/ "
                        f"or file:///DIR/ (or unset {MIRROR_ENV} for the official address)")
    base = base if base.endswith("/") else base + "/"
    for name, md5 in remote.md5.items():
        path = folder / name
        if path.is_file():
            if md5_of(path) == md5:
                log.info("%s: present, checksum ok", path)
                continue
            log.warning("%s: checksum differs from the official one; downloading it again", path)
        log.info("downloading %s%s -> %s", base, name, path)
        fetch_file(base + name, path, md5, timeout=timeout, progress=progress)
    return folder
