"""Readers of raw datasets: IDX (MNIST, Fashion-MNIST), the CIFAR-10 python archive, image folders, npz.

Each reader gives uint8 HxWxC images (C = 1 or 3) in a fixed order, labels when known, and class names,
as a ``RawDataset``; ``SOURCES`` maps the names ``python -m distgan.prepare`` accepts to the readers.

To add a format: write ``read_NAME(src, split, resolution, channels, limit) -> RawDataset`` (its docstring's
first line is the --help text; ``from_array`` does the resizing for in-memory arrays) and add one
``RawFormat`` entry to ``SOURCES`` at the end of this file. A format that can be downloaded also gets an
entry in ``distgan.data.download.REMOTES``.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image

from distgan.data.errors import DataError
from distgan.data.untrusted import load_cifar_pickle, read_npy_header

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
                 ".tif": "TIFF", ".tiff": "TIFF"}  # suffix -> Pillow format
IMAGE_SUFFIXES = set(IMAGE_FORMATS)
# Pillow decodes only these: any other plugin (EPS runs Ghostscript) is refused, whatever the file's name
PILLOW_FORMATS = sorted(set(IMAGE_FORMATS.values()))
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "F"}
SPLITS = ("train", "test")


@dataclass
class RawDataset:
    """A raw dataset ready to be written as shards: lazy images (HxWxC uint8) and labels, in order."""

    images: Iterable[np.ndarray]
    labels: Optional[Iterable[int]]
    classes: Optional[list[str]]
    count: int
    resolution: int
    channels: int


# ---------------------------------------------------------------- image fitting


def fit_image(image: Image.Image | np.ndarray, resolution: Optional[int], channels: int) -> np.ndarray:
    """Convert to grayscale/RGB, resize the shorter side to ``resolution`` and center-crop a square."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    image = _scaled_to_8_bits(image)
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    if resolution and image.size != (resolution, resolution):
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PIL modes I;16* and I) scaled to 8 bits (65535 -> 255); Pillow's convert("L")
    would clip it instead, turning nearly every pixel of a real 16-bit image white."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    array = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), mode="L")


def mixed_order(n: int) -> np.ndarray:
    """A fixed permutation of range(n): sources that may be sorted by class are written in this order."""
    return np.random.default_rng(0).permutation(n)


def from_array(images: np.ndarray, labels: Optional[np.ndarray], classes: Optional[list[str]],
               resolution: Optional[int], channels: Optional[int], limit: Optional[int]) -> RawDataset:
    """A RawDataset over an N,H,W,C uint8 array; images are converted only when resolution/channels differ."""
    if limit is not None:
        images, labels = images[:limit], (labels[:limit] if labels is not None else None)
    n, height, width, have = images.shape
    channels = channels or have
    if height != width and not resolution:
        raise DataError(f"images are {height}x{width}; pass --resolution R to resize and center-crop them")
    resolution = resolution or height
    if (resolution, channels) == (height, have):
        stream: Iterable[np.ndarray] = iter(images)
    else:
        stream = (fit_image(image, resolution, channels) for image in images)
    return RawDataset(stream, labels.tolist() if labels is not None else None, classes, n, resolution, channels)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAX_RATIO = 1032  # deflate never expands data more than this: the most a .gz of this size can hold
_CHUNK = 1 << 20


def read_idx(path: str | Path, limit: Optional[int] = None) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array; with ``limit`` only its first ``limit`` rows.

    Read as a stream: gzip is decompressed only as far as the rows kept, and the header's size is checked
    against what the file can hold before anything is allocated.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
            return _read_idx_stream(stream, path, file_size, gzipped, limit)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read: {err}") from None


def _read_idx_stream(stream: BinaryIO, path: Path, file_size: int, gzipped: bool, limit: Optional[int]) -> np.ndarray:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES or magic[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {magic.hex()})")
    ndim, dtype = magic[3], np.dtype(_IDX_TYPES[magic[2]])
    header = stream.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(header[4 * i:4 * i + 4], "big") for i in range(ndim))
    row_bytes = math.prod(dims[1:]) * dtype.itemsize
    total = dims[0] * row_bytes
    capacity = file_size * _GZIP_MAX_RATIO if gzipped else file_size - 4 - 4 * ndim
    if total > capacity or (not gzipped and total != capacity):
        raise DataError(f"{path}: its header ({dims}, {dtype}) needs {total} bytes but the file holds "
                        f"{'at most ' if gzipped else ''}{capacity}; truncated or not an IDX file?")
    rows = dims[0] if limit is None else min(dims[0], limit)
    data = _read_exactly(stream, rows * row_bytes)
    if len(data) < rows * row_bytes or (rows == dims[0] and stream.read(1)):
        raise DataError(f"{path}: its size does not match its header ({dims}, {dtype}); truncated?")
    array = np.frombuffer(data, dtype=dtype).reshape((rows, *dims[1:]))
    return array.astype(dtype.newbyteorder("="))


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, read in chunks (a single read(size) would allocate ``size`` up front)."""
    chunks, have = [], 0
    while have < size and (chunk := stream.read(min(_CHUNK, size - have))):
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem} or {stem}.gz")


def load_idx_split(folder: str | Path, split: str, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(images N,H,W uint8, labels N int64) of an MNIST-style folder; split is train or test (t10k files)."""
    folder, prefix = Path(folder), {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"), limit)
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"), limit)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{folder}: {prefix} images are {images.dtype} {images.shape}, expected uint8 N,H,W")
    if labels.shape != (len(images),):
        raise DataError(f"{folder}: {len(images)} {prefix} images but labels of shape {labels.shape}")
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------- CIFAR-10 python archive

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_MAX_FILE = 64 << 20  # a real batch file is 31 MB: refuse reading anything much larger
def _unpickle(data: bytes, name: str) -> dict:
    try:
        record = load_cifar_pickle(data)
    except Exception as err:  # any unpickling failure means "not a CIFAR-10 batch"
        raise DataError(f"{name}: not a CIFAR-10 python batch: {err}") from None
    if not isinstance(record, dict):
        raise DataError(f"{name}: not a CIFAR-10 python batch (a {type(record).__name__}, not a dict)")
    return record


@contextlib.contextmanager
def _cifar_files(src: Path, names: list[str]) -> Iterator[Callable[[str], bytes]]:
    """A reader of the named batch files from the .tar.gz archive or from an extracted cifar-10-batches-py folder:
    all are checked (there, not too big) first, and each file's bytes are read only when it is asked for."""
    if src.is_dir():
        if (src / CIFAR_DIR).is_dir():
            src = src / CIFAR_DIR
        elif (src / CIFAR_ARCHIVE).is_file():
            src = src / CIFAR_ARCHIVE
    if src.is_dir():
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise DataError(f"{src}: missing CIFAR-10 batch files {missing}")
        too_big = [n for n in names if (src / n).stat().st_size > CIFAR_MAX_FILE]
        if too_big:
            raise DataError(f"{src / too_big[0]}: larger than {CIFAR_MAX_FILE} bytes; not a CIFAR-10 batch")
        folder = src
        yield lambda name: (folder / name).read_bytes()
        return
    if not src.is_file():
        raise DataError(f"{src}: no CIFAR-10 archive ({CIFAR_ARCHIVE}) or {CIFAR_DIR} folder; use --download or --src")
    found: dict[str, tarfile.TarInfo] = {}
    try:
        archive = tarfile.open(src, "r:*")  # nothing is extracted to disk
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{src}: cannot read the CIFAR-10 archive: {err}") from None
    with archive:
        try:
            for member in archive:  # headers only: tarfile skips the data of members nobody extracts
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in found:
                    if member.size > CIFAR_MAX_FILE:
                        raise DataError(f"{src}: {member.name} has {member.size} bytes; not a CIFAR-10 batch")
                    found[base] = member
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{src}: cannot read the CIFAR-10 archive: {err}") from None
        missing = [n for n in names if n not in found]
        if missing:
            raise DataError(f"{src}: archive has no {missing} (expected {CIFAR_DIR}/data_batch_1..5, test_batch, "
                            "batches.meta)")

        def read(name: str) -> bytes:
            try:
                return archive.extractfile(found[name]).read()
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"{src}: cannot read {found[name].name} from the CIFAR-10 archive: {err}") from None

        yield read


def load_cifar10(src: str | Path, split: str, limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images N,32,32,3 uint8, labels int64, class names) from the official CIFAR-10 python version;
    batches past the first ``limit`` images are neither read nor unpickled."""
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    with _cifar_files(Path(src), batches + ["batches.meta"]) as read:
        classes = [c.decode() for c in _unpickle(read("batches.meta"), "batches.meta").get(b"label_names", [])]
        for name in batches:
            record = _unpickle(read(name), name)
            data, batch_labels = record.get(b"data"), record.get(b"labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{name}: b'data' should be a uint8 array N x 3072, got "
                                f"{getattr(data, 'shape', type(data))}")
            if batch_labels is None or len(batch_labels) != len(data):
                raise DataError(f"{name}: b'labels' missing or not one per image")
            try:
                labels.append(np.asarray(batch_labels, dtype=np.int64))
            except (TypeError, ValueError, OverflowError):
                raise DataError(f"{name}: b'labels' are not integers") from None
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are R, G, B planes (CHW)
            if limit is not None and sum(map(len, labels)) >= limit:
                break
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes or None


# ---------------------------------------------------------------- npz


def load_npz(path: str | Path, limit: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(images N,H,W,C uint8, labels or None) from arrays 'images'/'x' (+ 'labels'/'y'), in the fixed mixed
    order of ``mixed_order`` (arrays are often sorted by class); with ``limit``, only its first ``limit`` images,
    and only those are held in memory.

    Accepts N,H,W / N,H,W,C / N,C,H,W, uint8 (or integers in 0..255) or floats in [0, 1] or, when any
    value is negative, [-1, 1].
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
            key = next((k for k in ("images", "x") if k in members), None)
            if key is None:
                raise DataError(f"{path}: no 'images' or 'x' array (it has {sorted(members)})")
            rows: list[np.ndarray] = []  # the images kept: set once the images' header gives their count

            def keep(n: int) -> np.ndarray:
                if rows and n != rows[1]:
                    raise DataError(f"{path}: {n} labels for {rows[1]} images; expected one label per image")
                if not rows:
                    rows.extend((mixed_order(n)[:limit], n))
                return rows[0]

            images = _npz_member(archive, members[key], path, keep)
            label_key = next((k for k in ("labels", "y") if k in members), None)
            labels = _npz_member(archive, members[label_key], path, keep) if label_key else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: cannot read npz: {err}") from None
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: '{key}' has shape {images.shape}; expected N,H,W / N,H,W,C / N,C,H,W with C 1 or 3")
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise DataError(f"{path}: '{key}' has NaN or Inf values")
        low, high = float(images.min()), float(images.max())
        if low < 0:
            if low < -1.0001 or high > 1.0001:
                raise DataError(f"{path}: float '{key}' spans [{low:.3g}, {high:.3g}]; expected [0, 1] or [-1, 1]")
            images = (images.astype(np.float64) + 1.0) * 127.5
        elif high > 1.0001:
            raise DataError(f"{path}: float '{key}' spans [{low:.3g}, {high:.3g}]; expected [0, 1] or [-1, 1]")
        else:
            images = images.astype(np.float64) * 255.0
        images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    elif np.issubdtype(images.dtype, np.integer):
        if images.dtype != np.uint8 and (images.min() < 0 or images.max() > 255):
            raise DataError(f"{path}: integer '{key}' has values outside 0..255")
        images = images.astype(np.uint8)
    else:
        raise DataError(f"{path}: '{key}' has dtype {images.dtype}; expected uint8 or float")
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: labels of shape {labels.shape} {labels.dtype}; expected {len(images)} integers")
        labels = labels.astype(np.int64)
    return np.ascontiguousarray(images), labels


def _npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str | Path,
                keep: Callable[[int], np.ndarray]) -> np.ndarray:
    """Rows ``keep(rows in the array)`` of one array of an .npz, in that order: its header checked against the
    member's size before anything is allocated, then read in chunks, holding only the rows kept."""
    most = info.compress_size * (_GZIP_MAX_RATIO if info.compress_type != zipfile.ZIP_STORED else 1)
    name = f"{path}:{info.filename}"
    if info.file_size > most:
        raise DataError(f"{path}: member {info.filename} claims {info.file_size} bytes from {info.compress_size}; corrupt npz")
    with archive.open(info) as stream:
        shape, fortran, dtype = read_npy_header(stream, info.file_size, name)
        if not shape:
            raise DataError(f"{name}: a single number; expected an array with one row per image")
        wanted = keep(shape[0])
        if fortran:  # column-major: rows are not contiguous; read it whole (np.save writes C order)
            data = _read_exactly(stream, math.prod(shape) * dtype.itemsize)
            return parse_npy_body(data, shape, dtype, name, fortran)[wanted]
        row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        out = np.empty((len(wanted), *row_shape), dtype)
        order = np.argsort(wanted, kind="stable")
        sorted_rows, done = wanted[order], 0
        step = max(1, _CHUNK // max(row_bytes, 1))
        for start in range(0, shape[0], step):
            if done == len(wanted):
                break
            count = min(step, shape[0] - start)
            block = parse_npy_body(_read_exactly(stream, count * row_bytes), (count, *row_shape), dtype, name)
            end = int(np.searchsorted(sorted_rows, start + count))
            out[order[done:end]] = block[sorted_rows[done:end] - start]
            done = end
    return out


def parse_npy_body(data: bytes, shape: tuple[int, ...], dtype: np.dtype, name: str, fortran: bool = False) -> np.ndarray:
    """Bytes read from a .npy's data as an array of SHAPE (a view), or the error that the member is truncated."""
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise DataError(f"{name}: truncated ({len(data)} bytes where its header promises more)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


# ---------------------------------------------------------------- image folders


def scan_folder(root: str | Path) -> tuple[list[Path], Optional[list[int]], Optional[list[str]]]:
    """Image files under ``root`` (sorted, hidden ones skipped); labels from first-level sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--src {root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    parts = [p.relative_to(root).parts for p in files]
    if not all(len(part) > 1 for part in parts):
        if any(len(part) > 1 for part in parts):
            log.warning("%s: some images are not in a class sub-folder; writing no labels", root)
        return files, None, None
    classes = sorted({part[0] for part in parts})
    index = {name: i for i, name in enumerate(classes)}
    return files, [index[part[0]] for part in parts], classes


def read_folder(root: Path, split: str, resolution: Optional[int], channels: Optional[int],
                limit: Optional[int]) -> RawDataset:
    """An image folder: every image under it, in a fixed shuffled order; first-level sub-folders name the classes.

    ``split`` is ignored: a folder is one split. The order is shuffled (seed 0) so that every shard, and a
    ``--limit`` subset, mixes the classes: sorted by class, each shard and so each local batch held one class.
    """
    files, labels, classes = scan_folder(root)
    order = mixed_order(len(files))
    files, labels = [files[i] for i in order], ([labels[i] for i in order] if labels is not None else None)
    if limit is not None:
        files, labels = files[:limit], (labels[:limit] if labels is not None else None)
    sizes, modes = set(), set()
    for path in files:  # headers only: Image.open does not decode pixels
        try:
            with Image.open(path, formats=PILLOW_FORMATS) as image:
                sizes.add(image.size)
                modes.add(image.mode)
        except Exception as err:  # PIL raises many types for bad files
            raise DataError(f"{path}: cannot open image: {err}") from None
    if resolution is None:
        width, height = next(iter(sizes))
        if len(sizes) != 1 or width != height:
            example = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
            raise DataError(f"{root}: images are not all one square size ({example}); pass --resolution R")
        resolution = width
    channels = channels or (1 if modes <= GRAY_MODES else 3)

    def images() -> Iterator[np.ndarray]:
        for path in files:
            try:
                with Image.open(path, formats=PILLOW_FORMATS) as image:
                    yield fit_image(image, resolution, channels)
            except OSError as err:
                raise DataError(f"{path}: cannot decode image: {err}") from None

    return RawDataset(images(), labels, classes, len(files), resolution, channels)


# ---------------------------------------------------------------- readers of whole datasets


def _read_idx_dataset(name: str, classes: list[str], src: Path, split: str, resolution: Optional[int],
                      channels: Optional[int], limit: Optional[int]) -> RawDataset:
    if not src.is_dir():
        hint = (" Install it with `apt-get install dataset-fashion-mnist`," if name == "fashion-mnist" else "")
        raise DataError(f"{name}: no folder {src}.{hint} pass --download to fetch it, or --src DIR with the IDX files")
    images, labels = load_idx_split(src, split, limit)  # --limit applied while reading
    return from_array(images[..., None], labels, classes, resolution, channels, limit)


def read_fashion_mnist(src: Path, split: str, resolution: Optional[int], channels: Optional[int],
                       limit: Optional[int]) -> RawDataset:
    """Fashion-MNIST: a folder of IDX files (train-*, t10k-*, gzipped or not)."""
    return _read_idx_dataset("fashion-mnist", FASHION_MNIST_CLASSES, src, split, resolution, channels, limit)


def read_mnist(src: Path, split: str, resolution: Optional[int], channels: Optional[int],
               limit: Optional[int]) -> RawDataset:
    """MNIST: a folder of IDX files (train-*, t10k-*, gzipped or not)."""
    return _read_idx_dataset("mnist", MNIST_CLASSES, src, split, resolution, channels, limit)


def read_cifar10(src: Path, split: str, resolution: Optional[int], channels: Optional[int],
                 limit: Optional[int]) -> RawDataset:
    """CIFAR-10: the official python archive (cifar-10-python.tar.gz) or its extracted folder."""
    images, labels, classes = load_cifar10(src, split, limit)
    return from_array(images, labels, classes, resolution, channels, limit)


def read_npz(src: Path, split: str, resolution: Optional[int], channels: Optional[int],
             limit: Optional[int]) -> RawDataset:
    """An .npz file: array 'images' or 'x' (uint8 or floats), optional 'labels' or 'y'.

    ``split`` is ignored: a file is one split. Written in a fixed shuffled order, as a folder is: arrays are
    often sorted by class.
    """
    images, labels = load_npz(src, limit)  # mixed order; only the kept images are read into memory
    return from_array(images, labels, None, resolution, channels, None)


# ---------------------------------------------------------------- the table


Reader = Callable[[Path, str, Optional[int], Optional[int], Optional[int]], RawDataset]


@dataclass(frozen=True)
class RawFormat:
    """One entry of SOURCES: its reader, what --src names, and where --src points when not given."""

    read: Reader  # (src, split, resolution, channels, limit) -> RawDataset
    src: str  # what --src must name, for help and errors
    default_src: Optional[str] = None  # a fixed default --src (downloadable formats default to the cache)


SOURCES: dict[str, RawFormat] = {
    "fashion-mnist": RawFormat(read_fashion_mnist, "folder with the IDX files", FASHION_MNIST_DIR),
    "mnist": RawFormat(read_mnist, "folder with the IDX files"),
    "cifar10": RawFormat(read_cifar10, "CIFAR-10 archive or folder"),
    "folder": RawFormat(read_folder, "image folder"),
    "npz": RawFormat(read_npz, ".npz file"),
}


def open_source(name: str, src: str | Path, *, split: str = "train", resolution: Optional[int] = None,
                channels: Optional[int] = None, limit: Optional[int] = None) -> RawDataset:
    """The raw dataset ``name`` (a key of SOURCES) read from ``src`` (a folder, archive or file, as it needs)."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected train or test")
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name].read(Path(src), split, resolution, channels, limit)
