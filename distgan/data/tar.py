"""Reading shards as bytes: the one check of a shard URL, loading a shard into memory, and a fast tar parser.

Every shard address that distgan opens passes ``check_url`` first: ``pipe:`` URLs run shell commands, so
they are refused unless ``data.allow_pipe`` is set, and a scheme that neither a local path nor webdataset's
``gopen`` can open is refused with the list of those it can.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from typing import Iterator
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from webdataset.gopen import gopen_schemes

from distgan.data.errors import CorruptShardError, DataError
from distgan.data.untrusted import open_regular_file, read_bounded

LOCAL_SCHEMES = ("", "file")  # a plain path, or file:///path
MAX_SHARD_BYTES = 4 << 30  # a shard is read whole: refuse one (or its gunzipped content) past this
MAX_HEADER_BYTES = 1 << 20  # a pax header or GNU long name: real ones hold a few names and numbers


# ---------------------------------------------------------------- the URL check


def remote_schemes() -> list[str]:
    """URL schemes webdataset's gopen opens (read at call time: a user may register more)."""
    return sorted(s for s in gopen_schemes if s != "__default__")


def url_scheme(url: str) -> str:
    """The URL scheme of ``url``, lower case, as gopen sees it ("" for a plain path; leading spaces ignored)."""
    return urlparse(url).scheme


def check_url(url: str, allow_pipe: bool, where: str) -> str:
    """The scheme of ``url`` ("" for a plain path), after refusing ``pipe:`` (unless allowed) and unknown schemes.

    ``where`` starts the error message (``f"shard {url}"``, ``f"data.path {path!r}"``). The scheme is parsed the
    way gopen parses it, so ``PIPE:cmd`` and `` pipe:cmd`` are refused too (a prefix test would let them through).
    """
    scheme = url_scheme(url)
    if scheme == "pipe" and not allow_pipe:
        raise DataError(f"{where}: 'pipe:' URLs run shell commands; set data.allow_pipe=true to allow them")
    if scheme not in LOCAL_SCHEMES and scheme not in gopen_schemes:
        raise DataError(f"{where}: unsupported URL scheme '{scheme}:'; use a local path or one of "
                        f"{', '.join(s + ':' for s in remote_schemes())}")
    return scheme


def load_shard_bytes(url: str, allow_pipe: bool = False, max_bytes: int = MAX_SHARD_BYTES) -> bytes:
    """The whole shard in memory (a local path, or any URL webdataset's gopen can open); gunzips .tar.gz.

    Neither the file nor its gunzipped content may exceed ``max_bytes``: gzip is decompressed as a stream
    and stops at the bound, so a small gzip bomb cannot fill the memory.
    """
    scheme = check_url(url, allow_pipe, f"shard {url}")
    too_big = f"shard {url}: larger than {max_bytes} bytes%s; split it into smaller shards (prepare --shard-size)"
    try:
        if scheme in LOCAL_SCHEMES:  # local: plain open (webdataset's gopen refuses files under WDS_SECURE=1)
            # a FIFO or a device is refused by name (either would hang or report size 0), and the bound counts
            # the bytes read, not the size the file claims
            with open_regular_file(url2pathname(urlparse(url).path) if scheme else url, "shard") as stream:
                data = read_bounded(stream, max_bytes, too_big % "")
        else:
            with wds.gopen(url, "rb") as stream:
                data = read_bounded(stream, max_bytes, too_big % "")
    except FileNotFoundError:
        raise DataError(f"shard {url}: file not found (check data.path, or re-run python -m distgan.prepare)") from None
    except OSError as err:
        raise DataError(f"shard {url}: cannot read: {err}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                data = read_bounded(stream, max_bytes, too_big % " after gunzip")
        except (OSError, EOFError, zlib.error) as err:
            raise CorruptShardError(f"shard {url}: corrupt gzip: {err}") from None
    return data


# ---------------------------------------------------------------- the tar parser


def _tar_number(field_bytes: bytes) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large values (0xff: negative)
        return int.from_bytes(field_bytes[1:], "big", signed=field_bytes[:1] == b"\xff")
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """Records "LEN key=value\\n" of a pax extended header; each must fit and end where its LEN says."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if length <= len(digits) + 2 or end > len(data) or data[end - 1:end] != b"\n":
            raise DataError(f"{where}: corrupt pax header: bad record at byte {pos}")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end  # length > 0: every record moves forward
    return records


def _member_size(header: bytes, pax: dict[str, str]) -> int:
    """The member's size from its pax record or header field; ValueError unless a plain number >= 0."""
    if "size" in pax:
        text = pax["size"]
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"pax size {text[:30]!r} is not a number >= 0")
        return int(text)
    size = _tar_number(header[124:136])
    if size < 0:
        raise ValueError(f"negative size {size}")
    return size


def tar_members(data: bytes, shard: str) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in an in-memory tar.

    Our own parser, not tarfile or webdataset's tariterators: it is about 10x faster per member, which
    matters because per-sample overhead dominates for small images. Handles ustar, pax and GNU long names.
    Shards are untrusted: sizes are >= 0, so every header moves the position forward (no loops), members
    must fit in ``data`` and headers in MAX_HEADER_BYTES, so what it yields never exceeds ``data``.
    """
    pos, size_total, pending_name, pax = 0, len(data), None, {}
    last = "(start of shard)"
    while pos + 512 <= size_total:
        header = data[pos:pos + 512]
        if header.count(0) == 512:
            return
        kind = header[156:157]
        try:
            checksum = _tar_number(header[148:156])
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError("header checksum mismatch")
            size = _member_size(header, pax)
            if kind in (b"x", b"g", b"L") and size > MAX_HEADER_BYTES:
                raise ValueError(f"a {size}-byte extended header (at most {MAX_HEADER_BYTES})")
        except ValueError as err:
            raise DataError(f"shard {shard}: corrupt tar at byte {pos}, after member {last!r}: {err}") from None
        start = pos + 512
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
