"""Readers allocate by what they keep, not by what a file claims; data problems are one DataError that says the fix."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from conftest import require_fashion_mnist
from distgan import prepare
from distgan.config import DataConfig
from distgan.data import download as dl
from distgan.data.errors import DataError
from distgan.data.raw import FASHION_MNIST_DIR, open_source, read_idx
from distgan.data.shards import decode_image, read_dataset_info, read_images, write_shards

HUGE = 300_000_000  # bytes a hostile header asks for; every read below must stay far under it


@contextmanager
def peak_below(limit: int) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes, bound {limit}"


def idx_header(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


# ---------------------------------------------------------------- IDX


def test_idx_limit_is_applied_while_streaming(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (1000, 4, 4), dtype=np.uint8)  # incompressible
    whole = gzip.compress(idx_header(rows.shape) + rows.tobytes())
    cut = tmp_path / "cut-idx3-ubyte.gz"
    cut.write_bytes(whole[:len(whole) // 4])  # the stream breaks long before row 1000
    np.testing.assert_array_equal(read_idx(cut, limit=3), rows[:3])  # never reaches the damage
    with pytest.raises(DataError, match="cut-idx3-ubyte.gz: cannot read"):
        read_idx(cut)


def test_idx_header_is_checked_before_allocating(tmp_path):
    for name, data in (("plain", idx_header((HUGE, 1, 1)) + b"\0" * 64),
                       ("packed.gz", gzip.compress(idx_header((HUGE, 1, 1)) + b"\0" * 64))):
        with peak_below(4 << 20), pytest.raises(DataError, match=f"{name}: its header .* needs {HUGE} bytes"):
            (tmp_path / name).write_bytes(data)
            read_idx(tmp_path / name)


def test_real_fashion_mnist_limit_reads_only_what_it_keeps():
    require_fashion_mnist()
    with peak_below(8 << 20):  # the train images are 47 MB unpacked
        data = open_source("fashion-mnist", Path(FASHION_MNIST_DIR), limit=100)
    assert data.count == 100 and len(data.labels) == 100


# ---------------------------------------------------------------- CIFAR-10 pickles


class Reduce:
    """An object that pickles as ``callable(*args)`` (then ``state`` through BUILD, when given)."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def cifar_folder(tmp_path: Path, data: object) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"]}, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [0]}, protocol=2))
    return folder


RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]  # numpy's _reconstruct, whatever its module


@pytest.mark.parametrize("case, message", [
    ("ndarray called with a shape", "numpy.ndarray called directly"),
    ("_reconstruct without state", "array without its data"),
    ("state with a shape its bytes do not fill", r"shape \(300000000,\) needs 300000000 bytes but the pickle holds 3"),
    ("an object array", "dtype 'O8?' is not an integer type"),
])
def test_cifar_pickle_arrays_come_only_from_the_pickles_bytes(tmp_path, case, message):
    data = {
        "ndarray called with a shape": Reduce(np.ndarray, ((HUGE,), "u1")),
        "_reconstruct without state": Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b")),
        "state with a shape its bytes do not fill":
            Reduce(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (HUGE,), np.dtype(np.uint8), False, b"abc")),
        "an object array": np.array([None, 1], dtype=object),
    }[case]
    folder = cifar_folder(tmp_path, data)
    assert len((folder / "test_batch").read_bytes()) < 300
    with peak_below(4 << 20), pytest.raises(DataError, match=f"test_batch: not a CIFAR-10 python batch: .*{message}"):
        open_source("cifar10", folder, split="test")


def test_cifar_pickle_refuses_a_huge_memo_index(tmp_path):
    folder = cifar_folder(tmp_path, 0)
    (folder / "test_batch").write_bytes(b"\x80\x02N" + b"r" + (2**31 - 1).to_bytes(4, "little") + b".")
    with peak_below(4 << 20), pytest.raises(DataError, match="memo index 2147483647"):
        open_source("cifar10", folder, split="test")


def test_cifar_limit_stops_before_the_batches_it_does_not_need(tmp_path):
    from test_data import make_cifar

    make_cifar(tmp_path, per_batch=3)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(b"damaged")
    assert len(list(open_source("cifar10", folder, limit=5).images)) == 5  # batches 1 and 2 hold 6
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR-10 python batch"):
        open_source("cifar10", folder)


def test_cifar_archive_limit_reads_only_the_batches_it_needs(tmp_path, monkeypatch):
    """From the .tar.gz too: the batches past the limit are skipped over, never read into memory."""
    from test_data import make_cifar

    archive, expected = make_cifar(tmp_path, per_batch=3)
    read: list[str] = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, member: read.append(member.name.rsplit("/", 1)[-1]) or extract(self, member))
    dataset = open_source("cifar10", archive, limit=5)  # batches 1 and 2 hold 6
    np.testing.assert_array_equal(np.stack(list(dataset.images)), expected["train"][0][:5])
    assert sorted(read) == ["batches.meta", "data_batch_1", "data_batch_2"]
    read.clear()
    assert len(list(open_source("cifar10", archive).images)) == 15 and len(read) == 6


# ---------------------------------------------------------------- .npy and .npz


def npy_claiming(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 16


def test_npy_header_is_checked_against_its_bytes(tmp_path):
    claim = r"header says \(20000, 15000\) uint8 \(300000000 bytes\) but it holds 16"
    with peak_below(4 << 20), pytest.raises(ValueError, match=claim):
        decode_image({"npy": npy_claiming((20000, 15000))})
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        archive.writestr("images.npy", npy_claiming((HUGE // 16, 4, 4)))
    with peak_below(4 << 20), pytest.raises(DataError, match="big.npz: cannot read npz: .*images.npy: .npy header says"):
        open_source("npz", tmp_path / "big.npz")


# ---------------------------------------------------------------- image formats


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nshowpage\n%%EOF\n"


def test_only_the_image_formats_distgan_reads_are_decoded(tmp_path, monkeypatch):
    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Pillow ran Ghostscript")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(EPS)
    with pytest.raises(DataError, match="b.png: cannot open image: .*cannot identify"):
        list(open_source("folder", folder).images)
    with pytest.raises(ValueError, match="cannot decode .png: cannot identify"):
        decode_image({"png": EPS})


# ---------------------------------------------------------------- dataset.json


@pytest.mark.parametrize("count, ok", [(12, True), (10**12, False), ("12", False), (2, False), (11, True)])
def test_dataset_json_count_is_checked_against_the_shards(tmp_path, count, ok):
    out = tmp_path / "ds"
    write_shards(np.zeros((12, 4, 4), np.uint8), None, out, shard_size=5, progress=False)  # 5 + 5 + 2
    record = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps(dict(record, count=count)))
    if ok:
        assert read_dataset_info(str(out)).count == count
    else:
        with pytest.raises(DataError, match=r"dataset.json: count .* re-run python -m distgan.prepare"):
            read_dataset_info(str(out))


def test_dataset_json_shards_stay_in_the_folder(tmp_path):
    out = tmp_path / "ds"
    write_shards(np.zeros((3, 4, 4), np.uint8), None, out, progress=False)
    record = json.loads((out / "dataset.json").read_text())
    (out / "dataset.json").write_text(json.dumps(dict(record, shards=["../../etc/x.tar"])))
    with pytest.raises(DataError, match="'shards' must list the names of shard files in this folder"):
        read_dataset_info(str(out))


# ---------------------------------------------------------------- messages


@pytest.mark.parametrize("path, command", [
    ("data/cifar10", "python -m distgan.prepare cifar10 --download --out data/cifar10"),
    ("data/mnist", "python -m distgan.prepare mnist --download --out data/mnist"),
    ("data/fashion_mnist", "python -m distgan.prepare fashion-mnist{} --out data/fashion_mnist"),
    ("my data", "python -m distgan.prepare SOURCE --src YOUR_DATA --out 'my data'"),
])
def test_missing_data_names_the_prepare_command(tmp_path, monkeypatch, path, command):
    monkeypatch.chdir(tmp_path)
    command = command.format("" if Path(FASHION_MNIST_DIR).is_dir() else " --download")
    with pytest.raises(DataError) as raised:
        read_dataset_info(path)
    assert f"data.path {path}: no such folder" in str(raised.value) and command in str(raised.value)
    (tmp_path / path).mkdir(parents=True)
    with pytest.raises(DataError) as raised:
        read_dataset_info(path)
    assert "no dataset.json and no *.tar" in str(raised.value) and command in str(raised.value)


def test_read_images_without_images_is_a_data_error(tmp_path):
    out = tmp_path / "ds"
    write_shards(np.zeros((2, 4, 4), np.uint8), None, out, progress=False)
    info = read_dataset_info(str(out))
    info.resolution = 8  # every sample now has the wrong shape and is skipped
    with pytest.raises(DataError, match="no images in the shards"):
        read_images(info, DataConfig(path=str(out), skip_bad_samples=True), 4, seed=0)


@pytest.mark.parametrize("mirror", ["not a url", "data/mirror", "htp:/x"])
def test_download_mirror_that_is_not_a_url(tmp_path, monkeypatch, capsys, mirror):
    monkeypatch.setenv(dl.MIRROR_ENV, mirror)
    code = prepare.main(["mnist", "--download", "--src", str(tmp_path / "cache"), "--out", str(tmp_path / "o"),
                         "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{dl.MIRROR_ENV}={mirror!r} is not a URL" in err and "https://HOST/PATH/" in err
