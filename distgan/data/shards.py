"""webdataset shards: writing them (plus dataset.json), describing a set of shards, and decoding one shard.

A record is ``{"__key__": "%09d", "png": <PNG bytes>, "cls": b"<int>"}``. Reading accepts any standard
webdataset layout: the image under .png/.jpg/.jpeg/.webp/.npy, an optional .cls. The bytes of a shard
come from ``distgan.data.tar``.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image

from distgan import console
from distgan.config import DataConfig
from distgan.data.download import REMOTES
from distgan.data.errors import CorruptShardError, DataError
from distgan.data.raw import SOURCES
from distgan.output import Output
from distgan.data.tar import check_url, load_shard_bytes, tar_samples, url_scheme
from distgan.data.untrusted import parse_npy, read_regular_file
from distgan.errors import shown
from distgan.limits import MAX_RESOLUTION

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
FORMAT_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "npy")  # preference order when a record has several
SHARD_IMAGE_FORMATS = ["PNG", "JPEG", "WEBP"]  # the Pillow plugins allowed on shard bytes
# what an older distgan's evaluation wrote beside the shards (now in distgan.metrics.cache's folder: CACHE_DIR,
# CLASSIFIER_FILE and its .json): a shard folder holding them is still one distgan wrote
WRITTEN_BESIDE_SHARDS = ("eval_cache", "feature_classifier.safetensors", "feature_classifier.json")
TAR_MTIME = 1_700_000_000  # fixed member mtime: reproducible shards, and no pax header per member


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


def check_output_dir(out: str | os.PathLike, force: bool, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output that writing shards would damage (DataError naming the path and the fix).

    ``--out`` must be a local path (a ``pipe:`` or other URL would reach webdataset's writer). An existing
    ``out`` is replaced only with ``force``, and only when it is a folder of distgan shards (dataset.json and
    shard-*.tar, and what an older distgan's evaluation kept beside them, nothing else) that neither is nor holds a
    path in ``protect`` (the source being read).
    """
    text = os.fspath(out)
    if url_scheme(text):
        raise DataError(f"--out {text!r}: shards are written to a local folder, not a URL; pass a folder path")
    out = Path(text)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise DataError(f"--out {out} already exists; pass --force to replace it, or choose another --out")
    refuse = f"--force will not replace {out}:"
    if out.is_symlink() or not out.is_dir():
        what = "a symbolic link" if out.is_symlink() else "not a folder"
        raise DataError(f"{refuse} it is {what}; remove it yourself or choose another --out")
    resolved = out.resolve()
    for path in protect:
        source = Path(path).resolve()
        if source == resolved or resolved in source.parents:
            raise DataError(f"{refuse} it holds {path}, which this command reads; choose an --out outside it")
    if not (out / DATASET_JSON).is_file():
        raise DataError(f"{refuse} it has no {DATASET_JSON}, so distgan did not write it; "
                        "remove it yourself or choose another --out")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name != DATASET_JSON and not _is_shard_name(p.name) and not _left_by_evaluation(p))
    if foreign:
        raise DataError(f"{refuse} it holds {foreign[0]!r}, which distgan did not write; "
                        "move it away or choose another --out")


def _left_by_evaluation(path: Path) -> bool:
    """One of WRITTEN_BESIDE_SHARDS, and (eval_cache) holding only real statistics files."""
    if path.name not in WRITTEN_BESIDE_SHARDS or path.is_symlink():
        return False
    if path.name.startswith("feature_classifier"):
        return path.is_file()
    return (path.is_dir()
            and all(p.is_file() and p.name.startswith("real-") and ".safetensors" in p.name for p in path.iterdir()))


def _is_shard_name(name: str) -> bool:
    stem = name[len("shard-"):-len(".tar")]
    return name.startswith("shard-") and name.endswith(".tar") and stem.isdigit()


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
    protect: Iterable[str | os.PathLike] = (),
    total: Optional[int] = None,
    progress: bool = True,
) -> DatasetInfo:
    """Write uint8 images (HxW, HxWxC or CxHxW arrays or CPU tensors, one square size) as shards + dataset.json.

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the end
    (distgan.output.Output), so a failure, Ctrl-C or SIGTERM never leaves a partial dataset. A label < 0 means unknown (no .cls is written). An existing
    ``out_dir`` is replaced only as ``check_output_dir(out_dir, force, protect)`` allows.
    """
    if shard_size < 1:
        raise DataError(f"shard_size = {shard_size}: must be at least 1")
    check_output_dir(out_dir, force, protect)
    out = Path(out_dir)
    label_iter = iter(labels) if labels is not None else None
    count, shape = 0, None
    # written beside out_dir and renamed into place under a lock, with out_dir checked again then (distgan.output)
    with Output(out, folder=True, check=lambda target: check_output_dir(target, force, protect)) as tmp:
        # an absolute folder: the shard writer (webdataset's gopen) never sees something it could take for a URL
        pattern = str(tmp).replace("%", "%%") + os.sep + SHARD_PATTERN  # the writer %-formats the whole path
        writer = wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=TAR_MTIME)
        bar = console.progress(total=total, desc=f"writing {out.name}", unit="img", show=progress, leave=True)
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
    info.shards = [str(out / name) for name in shard_names]
    log.info("wrote %d images (%dx%dx%d) in %d shards to %s", count, *shape, len(shard_names), out)
    return info


# ---------------------------------------------------------------- dataset info


MAX_DATASET_JSON_BYTES = 16 << 20  # names of a few hundred thousand shards


def _info_from_json(folder: str, allow_pipe: bool = False) -> DatasetInfo:
    path = os.path.join(folder, DATASET_JSON)
    try:
        record = json.loads(read_regular_file(path, DATASET_JSON, MAX_DATASET_JSON_BYTES))
    except (OSError, ValueError, RecursionError) as err:
        raise DataError(f"{path}: cannot read: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        raise DataError(f"{path}: format_version {shown(version)}, this distgan reads {FORMAT_VERSION}")
    missing = [k for k in ("resolution", "channels", "shards") if k not in record]
    if missing:
        raise DataError(f"{path}: missing keys {missing}; re-run python -m distgan.prepare")
    resolution, channels, shards, count = (record.get(k) for k in ("resolution", "channels", "shards", "count"))
    classes = record.get("classes")
    fix = "re-run python -m distgan.prepare"
    if type(resolution) is not int or not 1 <= resolution <= MAX_RESOLUTION or channels not in (1, 3):
        raise DataError(f"{path}: resolution {shown(resolution)} / channels {shown(channels)}: need an integer from 1 "
                        f"to {MAX_RESOLUTION} and 1 or 3; {fix}")
    if not (isinstance(shards, list) and shards
            and all(isinstance(s, str) and s not in ("", ".", "..") and os.path.basename(s) == s for s in shards)):
        raise DataError(f"{path}: 'shards' must list the names of shard files in this folder; {fix}")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: 'classes' is {shown(classes)}: it must be a list of class names (or null for "
                        f"unlabeled data); {fix}")
    info = DatasetInfo(
        count=count, resolution=resolution, channels=channels, classes=classes,
        shards=[os.path.join(folder, s) for s in shards], source=record.get("source"), split=record.get("split"),
    )
    _check_against_first_shard(info, path, allow_pipe)
    return info


def _check_against_first_shard(info: DatasetInfo, path: str, allow_pipe: bool) -> None:
    """dataset.json's count, resolution and channels against the first shard, before anything is sized from them
    (the read stream sizes its blocks from the count, the networks from the resolution).

    Every shard holds at least one sample and none more than the first (prepare fills shards in order), so
    count lies in [shards, shards x samples of the first shard]; only the first shard is read.
    """
    count, n, url = info.count, len(info.shards), info.shards[0]
    if count is not None and (type(count) is not int or count < n):
        raise DataError(f"{path}: count {shown(count)} is not an integer >= the {n} shards; re-run python -m distgan.prepare")
    first, shape = _first_shard_facts(url, allow_pipe)
    if shape != (info.resolution, info.channels):
        raise DataError(f"{path}: says {info.resolution}x{info.resolution} images with {info.channels} channel(s), but "
                        f"the first image of {url} is {shape[0]}x{shape[0]} with {shape[1]}; re-run python -m distgan.prepare")
    if count is not None and (count > first * n or (n == 1 and count != first)):
        raise DataError(f"{path}: count {count} does not match the shards ({n} shards, the first holds {first} "
                        "samples); re-run python -m distgan.prepare")


def _first_shard_facts(url: str, allow_pipe: bool) -> tuple[int, tuple[int, int]]:
    """(samples, (resolution, channels) of its first image) of one shard."""
    samples, shape = 0, None
    for key, sample in tar_samples(load_shard_bytes(url, allow_pipe), url):
        samples += 1
        if shape is None:
            shape = _image_shape(url, key, sample)
    if shape is None:
        raise DataError(f"shard {url}: no samples (empty tar)")
    return samples, shape


def _image_shape(url: str, key: str, sample: dict[str, bytes]) -> tuple[int, int]:
    try:
        image = decode_image(sample)
    except ValueError as err:
        raise DataError(f"shard {url}: key {key}: {err}") from None
    if image.shape[0] != image.shape[1]:
        raise DataError(f"shard {url}: key {key}: image is {image.shape[0]}x{image.shape[1]}; distgan needs square images")
    return image.shape[0], image.shape[2]


def _inspect_first_sample(shards: list[str], allow_pipe: bool) -> tuple[int, int]:
    """(resolution, channels) of the first sample of the first shard, for shards without dataset.json."""
    url = shards[0]
    for key, sample in tar_samples(load_shard_bytes(url, allow_pipe), url):
        return _image_shape(url, key, sample)
    raise DataError(f"shard {url}: no samples (empty tar)")


def prepare_command(path: str) -> str:
    """The command that makes shards at ``path``; the source is guessed from the folder name (data/cifar10)."""
    compact = os.path.basename(os.path.normpath(path)).lower().replace("-", "").replace("_", "")
    source = next((s for s in ("fashion-mnist", "cifar10", "mnist") if s.replace("-", "") in compact), None)
    if source is None:
        return (f"python -m distgan.prepare SOURCE --src YOUR_DATA --out {shlex.quote(path)} "
                f"(SOURCE: {', '.join(SOURCES)})")
    default = SOURCES[source].default_src
    download = " --download" if source in REMOTES and not (default and os.path.isdir(default)) else ""
    return f"python -m distgan.prepare {source}{download} --out {shlex.quote(path)}"


def read_dataset_info(path: str, *, allow_pipe: bool = False) -> DatasetInfo:
    """Describe a dataset: a folder with dataset.json, a folder of *.tar, or a shard pattern/URL.

    Patterns use webdataset's syntax ("dir/shard-{000000..000009}.tar", "a.tar::b.tar"); without
    dataset.json the resolution and channels come from the first sample, and the count is unknown.
    """
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, DATASET_JSON)):  # not isfile: a FIFO there is refused by name
            return _info_from_json(path, allow_pipe)
        shards = sorted(glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*.tar.gz")))
        if not shards:
            raise DataError(f"data.path {path}: no {DATASET_JSON} and no *.tar shards in it; make them with: "
                            + prepare_command(path))
    else:
        shards = wds.shardlists.expand_urls(path)
        schemes = [check_url(s, allow_pipe, f"data.path {path!r}") for s in shards]  # refuse before any read
        if len(shards) == 1 and schemes[0] == "" and not os.path.exists(path):
            raise DataError(f"data.path {path}: no such folder or shard file; make the shards with: {prepare_command(path)}")
    resolution, channels = _inspect_first_sample(shards, allow_pipe)
    return DatasetInfo(count=None, resolution=resolution, channels=channels, classes=None, shards=shards)


# ---------------------------------------------------------------- reading one shard


def decode_image(sample: dict[str, bytes], max_pixels: Optional[int] = None) -> np.ndarray:
    """The sample's image as HxWxC uint8 (C = 1 or 3); raises ValueError when it cannot.

    Only PNG, JPEG and WebP are decoded (no other Pillow plugin runs on shard bytes), and an image of more
    than ``max_pixels`` is refused from its header, before its pixels are allocated.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member (.{', .'.join(IMAGE_EXTENSIONS)}); it has {sorted(sample)}")
    data = sample[ext]
    if ext == "npy":
        array = parse_npy(data, ".npy")
        if array.dtype != np.uint8:
            raise ValueError(f".npy has dtype {array.dtype}, expected uint8")
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
            array = array.transpose(1, 2, 0)  # CxHxW
    else:
        try:
            image = Image.open(io.BytesIO(data), formats=SHARD_IMAGE_FORMATS)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ValueError(f"image is {image.width}x{image.height}, over {max_pixels} pixels (not decoded)")
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


def parse_label(sample: dict[str, bytes], num_classes: Optional[int], need_labels: bool) -> int:
    """A sample's class from its ``.cls`` (-1: none), checked against the dataset's classes; ValueError if bad."""
    if "cls" not in sample:
        if need_labels:
            raise ValueError("no .cls label, but a conditional run needs every sample's class; label the sample "
                             "or re-run python -m distgan.prepare")
        return -1
    label = int(sample["cls"].decode().strip())
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is not one of dataset.json's {num_classes} classes (0..{num_classes - 1}); "
                         "fix the .cls or re-run python -m distgan.prepare")
    if not -2**63 <= label < 2**63:
        raise ValueError(f"label {label} does not fit int64")
    return label


def read_shard(
    url: str,
    *,
    resolution: Optional[int],
    channels: Optional[int],
    keep: Optional[Callable[[int], bool]] = None,
    skip_bad: bool = False,
    allow_pipe: bool = False,
    num_classes: Optional[int] = None,
    need_labels: bool = False,
) -> ShardData:
    """Decode one shard; ``keep(index_in_shard)`` selects samples before decoding (rank splitting).

    A label must be one of ``num_classes`` (dataset.json's classes) when given, and present when ``need_labels``
    (a conditional run). Errors name the shard and key. With ``skip_bad`` a bad sample (or the unreadable rest
    of a corrupt shard) is skipped and counted instead.
    """
    images, labels, keys, skipped, seen = [], [], [], 0, 0
    expected = (resolution, resolution, channels) if resolution and channels else None
    try:
        data = load_shard_bytes(url, allow_pipe)  # a missing shard is always an error
    except CorruptShardError as err:
        if not skip_bad:
            raise
        log.warning("%s (skipped)", err)
        data, skipped = b"", 1
    try:
        for index, (key, sample) in enumerate(tar_samples(data, url)):
            seen += 1
            if keep is not None and not keep(index):
                continue
            try:
                # a header claiming far more pixels than the dataset's images is refused before decoding
                image = decode_image(sample, max_pixels=4 * expected[0] * expected[1] if expected else None)
                if expected is not None and image.shape != expected:
                    raise ValueError(
                        f"image is {'x'.join(map(str, image.shape))} (HxWxC) but the dataset is "
                        f"{resolution}x{resolution}x{channels} (dataset.json or the first sample)")
                label = parse_label(sample, num_classes, need_labels)
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
                           skip_bad=data_cfg.skip_bad_samples, allow_pipe=data_cfg.allow_pipe,
                           num_classes=len(info.classes) if info.classes else None)
        images.append(shard.images)
        labels.append(shard.labels)
        have += len(shard.labels)
        if have >= n:
            break
    if have == 0:
        raise DataError(f"no images in the shards of {info.shards[0]} ...: cannot compute real statistics; "
                        "re-run python -m distgan.prepare")
    order = rng.permutation(have)[:n]
    return np.concatenate(images)[order], np.concatenate(labels)[order]


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], as the training stream gives them."""
    return images.float() / 127.5 - 1.0
