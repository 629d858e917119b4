"""Reading shards as bytes: the one check of a shard URL, loading a shard into memory, and a fast tar parser.

Every shard address that distgan opens passes ``check_url`` first: ``pipe:`` URLs run shell commands, so
they are refused unless ``data.allow_pipe`` is set, and a scheme that neither a local path nor webdataset's
``gopen`` can open is refused with the list of those it can.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from webdataset.gopen import gopen_schemes

from distgan.data.errors import DataError

LOCAL_SCHEMES = ("", "file")  # a plain path, or file:///path


# ---------------------------------------------------------------- the URL check


def remote_schemes() -> list[str]:
    """URL schemes webdataset's gopen opens (read at call time: a user may register more)."""
    return sorted(s for s in gopen_schemes if s != "__default__")


def check_url(url: str, allow_pipe: bool, where: str) -> str:
    """The scheme of ``url`` ("" for a plain path), after refusing ``pipe:`` (unless allowed) and unknown schemes.

    ``where`` starts the error message (``f"shard {url}"``, ``f"data.path {path!r}"``). The scheme is parsed the
    way gopen parses it, so ``PIPE:cmd`` is refused too (a prefix test would let it through to gopen).
    """
    scheme = urlparse(url).scheme
    if scheme == "pipe" and not allow_pipe:
        raise DataError(f"{where}: 'pipe:' URLs run shell commands; set data.allow_pipe=true to allow them")
    if scheme not in LOCAL_SCHEMES and scheme not in gopen_schemes:
        raise DataError(f"{where}: unsupported URL scheme '{scheme}:'; use a local path or one of "
                        f"{', '.join(s + ':' for s in remote_schemes())}")
    return scheme


def load_shard_bytes(url: str, allow_pipe: bool = False) -> bytes:
    """The whole shard in memory (a local path, or any URL webdataset's gopen can open); gunzips .tar.gz."""
    scheme = check_url(url, allow_pipe, f"shard {url}")
    try:
        if scheme in LOCAL_SCHEMES:  # local: plain open (webdataset's gopen refuses files under WDS_SECURE=1)
            data = Path(url2pathname(urlparse(url).path) if scheme else url).read_bytes()
        else:
            with wds.gopen(url, "rb") as stream:
                data = stream.read()
    except FileNotFoundError:
        raise DataError(f"shard {url}: file not found (check data.path, or re-run python -m distgan.prepare)") from None
    except OSError as err:
        raise DataError(f"shard {url}: cannot read: {err}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DataError(f"shard {url}: corrupt gzip: {err}") from None
    return data


# ---------------------------------------------------------------- the tar parser


def _tar_number(field_bytes: bytes) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large values
        return int.from_bytes(field_bytes[1:], "big", signed=field_bytes[:1] == b"\xff")
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """Records "LEN key=value\\n" of a pax extended header."""
    records, pos = {}, 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            records[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError as err:
        raise DataError(f"{where}: corrupt pax header: {err}") from None
    return records


def tar_members(data: bytes, shard: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in an in-memory tar.

    Our own parser, not tarfile or webdataset's tariterators: it is about 10x faster per member, which
    matters because per-sample overhead dominates for small images. Handles ustar, pax and GNU long names.
    """
    pos, size_total, pending_name, pax = 0, len(data), None, {}
    last = "(start of shard)"
    while pos + 512 <= size_total:
        header = data[pos:pos + 512]
        if header.count(0) == 512:
            return
        try:
            checksum = _tar_number(header[148:156])
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError("header checksum mismatch")
            size = int(pax.get("size", _tar_number(header[124:136])))
        except ValueError as err:
            raise DataError(f"shard {shard}: corrupt tar at byte {pos}, after member {last!r}: {err}") from None
        start, kind = pos + 512, header[156:157]
        if start + size > size_total:
            raise DataError(f"shard {shard}: truncated tar: member after {last!r} needs {size} bytes past the end")
        content = data[start:start + size]
        pos = start + (size + 511) // 512 * 512
        if kind == b"x":  # pax header: applies to the next member
            pax = _pax_records(content, f"shard {shard}: after member {last!r}")
        elif kind == b"L":  # GNU long name of the next member
            pending_name = content.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0", b"7"):  # regular file
            name = pending_name or pax.get("path")
            if name is None:
                name = header[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
                prefix = header[345:500].rstrip(b"\0").decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar" and prefix:
                    name = f"{prefix}/{name}"
            pending_name, pax, last = None, {}, name
            yield name, content
        elif kind != b"g":  # directories, links, devices: skipped
            pending_name, pax = None, {}
    if pos != size_total:
        raise DataError(f"shard {shard}: truncated tar: a header after {last!r} is cut off")


def tar_samples(data: bytes, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key the way webdataset does (key = path up to the first dot)."""
    key, sample = None, {}
    for name, content in tar_members(data, shard):
        prefix, ext = wds.tariterators.base_plus_ext(name)
        if prefix is None or os.path.basename(prefix).startswith("__"):
            continue
        if prefix != key:
            if sample:
                yield key, sample
            key, sample = prefix, {}
        ext = ext.lower()
        if ext in sample:
            raise DataError(f"shard {shard}: key {key}: duplicate member {name}")
        sample[ext] = content
    if sample:
        yield key, sample
