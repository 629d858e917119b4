"""webdataset shards: writing them (plus dataset.json), and reading one shard into numpy arrays.

A record is ``{"__key__": "%09d", "png": <PNG bytes>, "cls": b"<int>"}``. Reading accepts any standard
webdataset layout: the image under .png/.jpg/.jpeg/.webp/.npy, an optional .cls.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from distgan.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "npy")  # preference order when a record has several
TAR_MTIME = 1_700_000_000  # fixed member mtime: reproducible shards, and no pax header per member


class DataError(ValueError):
    """A data problem; the message names the file (shard) and key, and what to do."""


@dataclass
class DatasetInfo:
    """What the read stream needs to know about a set of shards (from dataset.json, or inferred)."""

    count: Optional[int]
    resolution: int
    channels: int
    classes: Optional[list[str]]
    shards: list[str]  # full paths or URLs
    source: Optional[str] = None
    split: Optional[str] = None


@dataclass
class ShardData:
    """One decoded shard: images uint8 [N, C, R, R], labels int64 [N] (-1 = unknown)."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str] = field(default_factory=list)
    skipped: int = 0  # bad samples skipped (skip_bad=True)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes


# ---------------------------------------------------------------- writing


def _as_hwc(image: np.ndarray, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"image {index}: dtype {image.dtype}, expected uint8 (scale to 0..255 first)")
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = image.transpose(1, 2, 0)  # CxHxW, as torch keeps images
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] != image.shape[1]:
        raise DataError(f"image {index}: shape {image.shape}, expected a square HxW, HxWxC or CxHxW (C = 1 or 3)")
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxWx1 or HxWx3 uint8 array (lossless, so reads give back the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset_json(out_dir: Path, info: DatasetInfo) -> None:
    record = {
        "format_version": FORMAT_VERSION, "count": info.count, "resolution": info.resolution,
        "channels": info.channels, "classes": info.classes, "shards": [Path(s).name for s in info.shards],
        "source": info.source, "split": info.split,
    }
    (out_dir / DATASET_JSON).write_text(json.dumps(record, indent=2) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is swapped aside first, then removed."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_shards(
    images: Iterable[np.ndarray],
    labels: Optional[Iterable[int]],
    out_dir: str | os.PathLike,
    *,
    classes: Optional[list[str]] = None,
    source: Optional[str] = None,
    split: Optional[str] = None,
    shard_size: int = 5000,
    force: bool = False,
    total: Optional[int] = None,
    progress: bool = True,
) -> DatasetInfo:
    """Write uint8 images (HxW, HxWxC or CxHxW arrays or CPU tensors, one square size) as shards + dataset.json.

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the end,
    so a failure never leaves a partial dataset. A label < 0 means unknown (no .cls is written).
    """
    out = Path(out_dir)
    if shard_size < 1:
        raise DataError(f"shard_size = {shard_size}: must be at least 1")
    if out.exists() and not force:
        raise DataError(f"output folder {out} already exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the dataset should get the usual permissions
    label_iter = iter(labels) if labels is not None else None
    count, shape = 0, None
    try:
        writer = wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=shard_size, verbose=0, mtime=TAR_MTIME)
        bar = tqdm(total=total, desc=f"writing {out.name}", unit="img", file=sys.stderr, disable=not progress)
        with bar:
            for index, image in enumerate(images):
                image = _as_hwc(image, index)
                if shape is None:
                    shape = image.shape
                elif image.shape != shape:
                    raise DataError(f"image {index}: shape {image.shape} differs from the first image's {shape}")
                record = {"__key__": "%09d" % index, "png": encode_png(image)}
                if label_iter is not None:
                    label = next(label_iter, None)
                    if label is None:
                        raise DataError(f"fewer labels than images: no label for image {index}")
                    if int(label) >= 0:
                        record["cls"] = b"%d" % int(label)
                writer.write(record)
                count += 1
                bar.update(1)
        writer.close()
        if count == 0:
            raise DataError(f"no images to write to {out} (is the source empty, or --limit 0?)")
        shard_names = sorted(p.name for p in tmp.glob("shard-*.tar"))
        info = DatasetInfo(count, shape[0], shape[2], classes, shard_names, source, split)
        write_dataset_json(tmp, info)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info.shards = [str(out / name) for name in shard_names]
    log.info("wrote %d images (%dx%dx%d) in %d shards to %s", count, *shape, len(shard_names), out)
    return info


# ---------------------------------------------------------------- reading one shard


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


def load_shard_bytes(url: str, allow_pipe: bool = False) -> bytes:
    """The whole shard in memory (a local path, or any URL webdataset's gopen can open); gunzips .tar.gz."""
    if url.startswith("pipe:") and not allow_pipe:
        raise DataError(f"shard {url}: 'pipe:' URLs run shell commands; set data.allow_pipe=true to allow them")
    parsed = urlparse(url)
    try:
        if parsed.scheme in ("", "file"):  # local: plain open (webdataset's gopen refuses files under WDS_SECURE=1)
            data = Path(url2pathname(parsed.path) if parsed.scheme else url).read_bytes()
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


def decode_image(sample: dict[str, bytes]) -> np.ndarray:
    """The sample's image as HxWxC uint8 (C = 1 or 3); raises ValueError when it cannot."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}); it has {sorted(sample)}")
    data = sample[ext]
    if ext == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype != np.uint8:
            raise ValueError(f".npy has dtype {array.dtype}, expected uint8")
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CxHxW
    else:
        try:
            image = Image.open(io.BytesIO(data))
            if image.mode not in ("L", "RGB"):
                gray = image.mode in ("1", "LA", "I", "I;16", "F", "La")
                image = image.convert("L" if gray else "RGB")
            array = np.asarray(image)
        except Exception as err:  # PIL raises many types for bad bytes
            raise ValueError(f"cannot decode .{ext}: {err}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"image has shape {array.shape}; expected HxW, HxWx1 or HxWx3")
    return array


def read_shard(
    url: str,
    *,
    resolution: Optional[int],
    channels: Optional[int],
    keep: Optional[Callable[[int], bool]] = None,
    skip_bad: bool = False,
    allow_pipe: bool = False,
) -> ShardData:
    """Decode one shard; ``keep(index_in_shard)`` selects samples before decoding (rank splitting).

    Errors name the shard and key. With ``skip_bad`` a bad sample (or the unreadable rest of a corrupt
    shard) is skipped and counted instead.
    """
    images, labels, keys, skipped, seen = [], [], [], 0, 0
    expected = (resolution, resolution, channels) if resolution and channels else None
    data = load_shard_bytes(url, allow_pipe)  # a missing shard is always an error
    try:
        for index, (key, sample) in enumerate(tar_samples(data, url)):
            seen += 1
            if keep is not None and not keep(index):
                continue
            try:
                image = decode_image(sample)
                if expected is not None and image.shape != expected:
                    raise ValueError(
                        f"image is {'x'.join(map(str, image.shape))} (HxWxC) but the dataset is "
                        f"{resolution}x{resolution}x{channels} (dataset.json or the first sample)")
                label = int(sample["cls"].decode().strip()) if "cls" in sample else -1
            except (ValueError, UnicodeDecodeError) as err:
                if not skip_bad:
                    raise DataError(f"shard {url}: key {key}: {err} (data.skip_bad_samples=true skips such samples)") from None
                skipped += 1
                log.debug("shard %s: key %s skipped: %s", url, key, err)
                continue
            images.append(image)
            labels.append(label)
            keys.append(key)
            expected = expected or image.shape
    except DataError as err:  # with skip_bad, only tar-level damage gets here
        if not skip_bad:
            raise
        skipped += 1
        log.warning("%s (skipped; keeping the %d samples read before it)", err, len(images))
    if seen == 0 and not skipped:
        message = f"shard {url}: no samples (empty tar)"
        if not skip_bad:
            raise DataError(message + "; remove it from the shard list or re-run python -m distgan.prepare")
        log.warning("%s (skipped)", message)
    if images:
        stacked = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
    else:
        res, ch = resolution or 0, channels or 0
        stacked = np.zeros((0, ch, res, res), np.uint8)
    return ShardData(stacked, np.asarray(labels, dtype=np.int64), keys, skipped)


def count_samples(url: str, allow_pipe: bool = False) -> int:
    """Samples in a shard, without decoding images."""
    return sum(1 for _ in tar_samples(load_shard_bytes(url, allow_pipe), url))


# ---------------------------------------------------------------- a fixed sample of images (evaluation, train-features)


def read_images(info: DatasetInfo, data_cfg: DataConfig, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` distinct images (uint8 [N, C, R, R]) and labels (-1 unknown) from ``info``'s shards.

    Shards are read in an order shuffled by ``seed`` until ``n`` images are in hand, then the images are
    shuffled by ``seed``: a deterministic sample, whatever the process count. (The training stream is not
    used: its blocks repeat samples when n exceeds a block.)
    """
    rng = np.random.default_rng([seed, 1])
    images, labels, have = [], [], 0
    for index in rng.permutation(len(info.shards)):
        shard = read_shard(info.shards[index], resolution=info.resolution, channels=info.channels,
                           skip_bad=data_cfg.skip_bad_samples, allow_pipe=data_cfg.allow_pipe)
        images.append(shard.images)
        labels.append(shard.labels)
        have += len(shard.labels)
        if have >= n:
            break
    if have == 0:
        raise ConfigError(f"no images in the shards of {info.shards[0]} ...: cannot compute real statistics")
    order = rng.permutation(have)[:n]
    return np.concatenate(images)[order], np.concatenate(labels)[order]


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], as the training stream gives them."""
    return images.float() / 127.5 - 1.0
