"""The shard reader on damaged and hostile shards: it ends quickly, in bounded memory, with data or a DataError.

A property-based test mutates valid shards (byte flips, truncation, inserted pax headers, rewritten size
fields with valid checksums, so the damage reaches the size logic; some gzipped, some with the gzip damaged)
and reads each through ``read_shard``
under a time limit (SIGALRM) and tracemalloc. The known hangs of the first parser are explicit cases.
"""
from __future__ import annotations

import gzip
import io
import signal
import tarfile
import tempfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from distgan.data.errors import DataError
from distgan.data.shards import ShardData, encode_png, read_shard
from distgan.data.tar import load_shard_bytes, tar_members

RES = 4
SECONDS = 2.0  # a healthy read of these shards takes milliseconds
MAX_PEAK = 8 << 20  # bytes; a shard here is a few KiB


class Hang(BaseException):
    """Raised by the alarm; a BaseException, so no ``except Exception`` in the reader can swallow it."""


@contextmanager
def bounded(seconds: float = SECONDS, max_peak: int = MAX_PEAK) -> Iterator[None]:
    """Fail if the block runs past ``seconds`` (it is interrupted) or its traced allocations peak past ``max_peak``."""
    def interrupt(*_) -> None:
        raise Hang(f"still running after {seconds} s: the reader loops")

    previous = signal.signal(signal.SIGALRM, interrupt)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang as hang:
        raise AssertionError(str(hang)) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < max_peak, f"the read allocated {peak} bytes at its peak (bound: {max_peak})"


def header_block(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT)


def pax_block(records: bytes) -> bytes:
    """A pax extended header ('x') holding ``records`` as they are (valid or not), with a valid checksum."""
    return header_block("././@PaxHeader", len(records), tarfile.XHDTYPE) + records + b"\0" * (-len(records) % 512)


def with_size(header: bytes, field: bytes) -> bytes:
    """``header`` with its 12-byte size field replaced and the checksum recomputed."""
    block = bytearray(header)
    block[124:136] = field
    return fix_checksum(block)


def fix_checksum(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def size_field(value: int, base256: bool) -> bytes:
    if base256 or not 0 <= value < 8**11:
        return (b"\xff" if value < 0 else b"\x80") + value.to_bytes(11, "big", signed=value < 0)
    return b"%011o\0" % value


def valid_shard(fmt: int) -> bytes:
    """Three 4x4 gray samples (png + cls) and one with a 150-character name (a pax path or GNU long name)."""
    rng = np.random.default_rng(fmt)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for key in ("000000000", "000000001", "k" * 150):
            png = encode_png(rng.integers(0, 256, (RES, RES, 1), dtype=np.uint8))
            for ext, payload in (("png", png), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(payload), 1_700_000_000
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


SHARDS = {fmt: valid_shard(fmt) for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)}
HEADERS = {fmt: [m.offset for m in tarfile.open(fileobj=io.BytesIO(data))] for fmt, data in SHARDS.items()}
SHARD_FILE = Path(tempfile.mkdtemp(prefix="distgan-fuzz-")) / "shard.tar"


def read(data: bytes, skip_bad: bool = False) -> ShardData:
    SHARD_FILE.write_bytes(data)
    return read_shard(str(SHARD_FILE), resolution=RES, channels=1, skip_bad=skip_bad)


def ends_well(data: bytes, skip_bad: bool = False) -> None:
    """Reading ``data`` ends in time and memory with valid images or a DataError (skip_bad: always data)."""
    with bounded():
        try:
            shard = read(data, skip_bad)
        except DataError:
            assert not skip_bad, "skip_bad_samples=true must skip damage, not raise"
            return
    assert shard.images.dtype == np.uint8 and shard.images.shape[1:] == (1, RES, RES)
    assert len(shard.labels) == len(shard.images) <= 3


# ---------------------------------------------------------------- the known cases, one by one

PNG = encode_png(np.zeros((RES, RES, 1), np.uint8))


def member(key: str) -> bytes:
    return header_block(f"{key}.png", len(PNG)) + PNG + b"\0" * (-len(PNG) % 512)


MEMBER = member("000000000")
END = b"\0" * 1024

KNOWN = {
    # pax size that jumps back to the pax header itself: the first parser looped forever
    "pax size jumps back": pax_block(b"15 size=-1536\n") + MEMBER + END,
    # a GNU base-256 negative size: the position stays put
    "base-256 negative size": with_size(MEMBER[:512], size_field(-512, True)) + MEMBER[512:] + END,
    # an octal field int() reads as negative
    "octal negative size": with_size(MEMBER[:512], b"-0000001000\0") + MEMBER[512:] + END,
    # "0 size=1": a pax record of length 0 never advanced
    "pax record of length 0": pax_block(b"0 size=1\n") + MEMBER + END,
    # a member whose negative size jumps back over earlier members: every pass yields them again (memory grew)
    "negative size jumps back over members":
        member("a") + member("b") + member("c") + with_size(MEMBER[:512], size_field(-4 * 1024 - 512, True)) + END,
    "pax size not a number": pax_block(b"13 size=1e99\n") + MEMBER + END,
    "huge pax header": with_size(header_block("././@PaxHeader", 0, tarfile.XHDTYPE), size_field(1 << 40, True)) + END,
    "pax record longer than the header": pax_block(b"99 size=1\n") + MEMBER + END,
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_hostile_shards_end_with_a_data_error(case):
    with bounded():
        with pytest.raises(DataError, match=r"shard .*shard.tar: (corrupt|truncated) (tar|pax)|corrupt pax header"):
            read(KNOWN[case])


def test_valid_shards_read_whole():
    for data in SHARDS.values():
        shard = read(data)
        assert len(shard.images) == 3 and shard.labels.tolist() == [3, 3, 3]
        assert [name for name, _ in tar_members(data, "x")][-2:] == ["k" * 150 + ".png", "k" * 150 + ".cls"]


def test_gzip_is_read_as_a_bounded_stream(tmp_path):
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (32 << 20)))  # 32 KiB on disk, 32 MiB inside
    with bounded(max_peak=8 << 20):  # a quarter of what is inside
        with pytest.raises(DataError, match=r"bomb.tar.gz: larger than 1048576 bytes .*after gunzip"):
            load_shard_bytes(str(bomb), max_bytes=1 << 20)
    shard = tmp_path / "shard.tar.gz"
    shard.write_bytes(gzip.compress(SHARDS[tarfile.PAX_FORMAT]))
    assert load_shard_bytes(str(shard)) == SHARDS[tarfile.PAX_FORMAT]
    shard.write_bytes(gzip.compress(SHARDS[tarfile.PAX_FORMAT])[:-30])
    with pytest.raises(DataError, match="shard.tar.gz: corrupt gzip"):
        load_shard_bytes(str(shard))
    big = tmp_path / "big.tar"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(DataError, match="big.tar: larger than 1024 bytes"):
        load_shard_bytes(str(big), max_bytes=1024)


# ---------------------------------------------------------------- property-based: mutated shards


@st.composite
def mutated_shard(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(SHARDS)))
    data, headers = bytearray(SHARDS[fmt]), HEADERS[fmt]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip header", "truncate", "pax", "size"]))
        if kind == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "flip header":  # damage a header field but keep its checksum valid, so parsing goes on
            at = draw(st.sampled_from(headers))
            if at + 512 <= len(data):
                block = bytearray(data[at:at + 512])
                block[draw(st.integers(0, 511))] = draw(st.integers(0, 255))
                data[at:at + 512] = fix_checksum(block)
        elif kind == "pax":
            key = draw(st.sampled_from([b"size", b"path", b"mtime", draw(st.binary(max_size=4))]))
            value = draw(st.one_of(st.integers(-(1 << 40), 1 << 40).map(lambda v: b"%d" % v), st.binary(max_size=8)))
            body = b" " + key + b"=" + value + b"\n"
            length = draw(st.one_of(st.just(len(body) + 2), st.integers(0, 600)))  # mostly right, sometimes a lie
            records = b"%d" % length + body
            at = min(draw(st.sampled_from(headers)), len(data))
            data[at:at] = pax_block(records)
        elif kind == "size":
            at = draw(st.sampled_from(headers))
            if at + 512 <= len(data):
                value = draw(st.one_of(st.integers(-4096, 4096), st.integers(-(1 << 70), 1 << 70)))
                field = size_field(value, draw(st.booleans())) if abs(value) < 1 << 80 else b"\0" * 12
                data[at:at + 512] = with_size(data[at:at + 512], field[:12].ljust(12, b"\0"))
    packing = draw(st.sampled_from(["tar", "tar.gz", "damaged tar.gz"]))  # .tar.gz shards are gunzipped first
    if packing == "tar":
        return bytes(data)
    packed = bytearray(gzip.compress(bytes(data), mtime=0))
    if packing == "damaged tar.gz":
        packed[draw(st.integers(2, len(packed) - 1))] ^= draw(st.integers(1, 255))
        packed = packed[:draw(st.integers(2, len(packed)))]
    return bytes(packed)


# no shrinking: a failing example may take SECONDS each time, and the first one found is reported as it is
@settings(max_examples=600, derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=mutated_shard(), skip_bad=st.booleans())
@example(data=KNOWN["pax size jumps back"], skip_bad=True)
@example(data=KNOWN["negative size jumps back over members"], skip_bad=True)
def test_mutated_shards_end_in_time_with_data_or_a_data_error(data, skip_bad):
    ends_well(data, skip_bad)
