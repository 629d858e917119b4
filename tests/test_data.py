"""Sources -> shards: IDX, CIFAR-10 archives, image folders, npz, the shard writer, download, and the CLI."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import require_fashion_mnist
from distgan import prepare
from distgan.train import main as train_main
from distgan.data import download as dl
from distgan.data.errors import DataError
from distgan.data.raw import FASHION_MNIST_DIR, load_idx_split, mixed_order, open_source, read_idx
from distgan.data.shards import read_dataset_info, read_shard, write_shards

REPO = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of a uint8 array: magic 0,0,8,ndim then big-endian dims."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train", gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array, dims in (("images", images, 3), ("labels", labels, 1)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-idx{dims}-ubyte"
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def read_all(info) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_shard(s, resolution=info.resolution, channels=info.channels) for s in info.shards]
    return np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    write_idx_folder(tmp_path, images, labels, "t10k", gz=gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)
    got_images, got_labels = load_idx_split(tmp_path, "test")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels.astype(np.int64))
    (tmp_path / "cut").write_bytes(idx_bytes(images)[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "cut")


def test_real_fashion_mnist_reads():
    require_fashion_mnist()
    images, labels = load_idx_split(FASHION_MNIST_DIR, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert np.bincount(labels).tolist() == [6000] * 10
    assert load_idx_split(FASHION_MNIST_DIR, "test")[0].shape == (10000, 28, 28)


# ---------------------------------------------------------------- CIFAR-10


def cifar_pickle(record: dict) -> bytes:
    """Protocol 2 with numpy.core names, like the official (Python 2) CIFAR-10 batches."""
    return pickle.dumps(record, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_cifar(root: Path, per_batch: int = 3) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny CIFAR-10 in the real python format; returns (archive path, expected HWC images per split)."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        record = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                  b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(cifar_pickle(record))
        split = "test" if name == "test_batch" else "train"
        expected[split].append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), record[b"labels"]))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(cifar_pickle({b"label_names": names, b"num_cases_per_batch": per_batch}))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, {k: (np.concatenate([i for i, _ in v]), np.concatenate([l for _, l in v])) for k, v in expected.items()}


@pytest.mark.parametrize("use_archive", [True, False])
def test_cifar10_round_trip(tmp_path, use_archive):
    archive, expected = make_cifar(tmp_path / "raw")
    src = archive if use_archive else tmp_path / "raw" / "cifar-10-batches-py"
    for split in ("train", "test"):
        out = tmp_path / f"out-{split}"
        assert prepare.main(["cifar10", "--src", str(src), "--out", str(out), "--split", split, "--no-progress"]) == 0
        record = json.loads((out / "dataset.json").read_text())
        assert record["classes"][:2] == ["airplane", "automobile"] and record["channels"] == 3
        images, labels = read_all(read_dataset_info(str(out)))
        np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), expected[split][0])  # exact pixels, HWC order
        np.testing.assert_array_equal(labels, expected[split][1])
    assert record["count"] == 3 and json.loads((tmp_path / "out-train" / "dataset.json").read_text())["count"] == 15


def test_cifar10_refuses_arbitrary_pickles(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle io.open"):
        open_source("cifar10", tmp_path / "cifar-10-batches-py", split="test")
    assert not marker.exists()


# ---------------------------------------------------------------- folder and npz


def test_folder_source(tmp_path):
    root = tmp_path / "images"
    (root / "cat" / "nested").mkdir(parents=True)
    (root / "dog").mkdir()
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :4], wide[:, 4:12], wide[:, 12:] = (255, 0, 0), (0, 200, 0), (0, 0, 255)
    Image.fromarray(wide).save(root / "cat" / "a_wide.png")  # 16x8: cropped to its green center
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(root / "cat" / "nested" / "b_gray.png")
    Image.fromarray(np.full((32, 24, 3), (255, 0, 0), np.uint8)).save(root / "dog" / "c_red.png")  # downscaled
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / ".hidden" / "skip.png")

    with pytest.raises(DataError, match="--resolution"):
        open_source("folder", root)
    out = tmp_path / "rgb"
    assert prepare.main(["folder", "--src", str(root), "--out", str(out), "--resolution", "8", "--no-progress"]) == 0
    record = json.loads((out / "dataset.json").read_text())
    assert (record["classes"], record["count"], record["channels"], record["resolution"]) == (["cat", "dog"], 3, 3, 8)
    images, labels = read_all(read_dataset_info(str(out)))
    wide, gray_file, red = (list(mixed_order(3)).index(i) for i in range(3))  # sorted file i is written at this place
    assert labels[[wide, gray_file, red]].tolist() == [0, 0, 1]
    assert (images[wide].transpose(1, 2, 0) == (0, 200, 0)).all()  # the center crop of the wide image
    assert (images[gray_file] == 77).all()  # grayscale -> RGB repeats the gray value
    assert np.abs(images[red].astype(int).transpose(1, 2, 0) - (255, 0, 0)).max() <= 1

    gray = open_source("folder", root, resolution=8, channels=1)
    gray_images = list(gray.images)
    assert gray.channels == 1 and gray_images[red].shape == (8, 8, 1)
    assert abs(int(gray_images[red][4, 4, 0]) - 76) <= 1  # ITU-R 601 luma of pure red


def test_class_sorted_sources_are_written_mixed(tmp_path):
    """A folder or array sorted by class: every shard (and a --limit subset) holds several classes, or each
    local batch, read from one shard, would hold one class."""
    root = tmp_path / "images"
    for name in ("a", "b", "c", "d"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((4, 4), i, np.uint8)).save(root / name / f"{i}.png")
    assert prepare.main(["folder", "--src", str(root), "--out", str(tmp_path / "out"), "--shard-size", "10",
                         "--no-progress"]) == 0
    info = read_dataset_info(str(tmp_path / "out"))
    per_shard = [set(read_all(dataclasses.replace(info, shards=[shard], count=None))[1].tolist())
                 for shard in info.shards]
    assert len(per_shard) == 4 and all(len(classes) >= 3 for classes in per_shard), per_shard
    np.savez(tmp_path / "sorted.npz", images=np.zeros((40, 4, 4), np.uint8), labels=np.repeat(np.arange(4), 10))
    assert len(set(open_source("npz", tmp_path / "sorted.npz", limit=10).labels)) >= 3


def test_npz_source(tmp_path):
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images=(u8.transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float32), labels=np.arange(6))
    np.savez(tmp_path / "nhwc.npz", x=(u8 / 255.0), y=np.arange(6) % 2)
    np.savez(tmp_path / "nhw.npz", x=u8[..., 0])
    np.savez(tmp_path / "bad.npz", pixels=u8)
    order = mixed_order(6)
    a = open_source("npz", tmp_path / "nchw.npz")
    np.testing.assert_array_equal(np.stack(list(a.images)), u8[order])
    assert a.labels == order.tolist()
    b = open_source("npz", tmp_path / "nhwc.npz", limit=4)
    np.testing.assert_array_equal(np.stack(list(b.images)), u8[order[:4]])
    assert b.labels == (order[:4] % 2).tolist() and b.count == 4
    c = open_source("npz", tmp_path / "nhw.npz", channels=3)
    assert c.labels is None and np.stack(list(c.images)).shape == (6, 4, 4, 3)
    with pytest.raises(DataError, match="no 'images' or 'x'"):
        open_source("npz", tmp_path / "bad.npz")


def test_npz_limit_reads_only_the_images_it_keeps(tmp_path, monkeypatch):
    """--limit on a large .npz: the kept images (the same ones and order a whole read gives) are all that is
    held, read in chunks whose edges fall inside the array; compressed or not, C or Fortran order."""
    import tracemalloc

    from distgan.data import raw

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)  # 6 MB
    labels = rng.integers(0, 10, 2000)
    np.savez(tmp_path / "big.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "zipped.npz", images=images, labels=labels)
    np.savez(tmp_path / "fortran.npz", images=np.asfortranarray(images[:50]), labels=labels[:50])
    keep = mixed_order(2000)[:20]
    monkeypatch.setattr(raw, "_CHUNK", 7 * 3072 + 5)  # chunks of 7 images: the kept rows straddle many edges
    for name in ("big.npz", "zipped.npz"):
        tracemalloc.start()
        got, got_labels = raw.load_npz(tmp_path / name, limit=20)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(got, images[keep])
        np.testing.assert_array_equal(got_labels, labels[keep])
        assert peak < 1_000_000, f"{name}: {peak} bytes held for 20 images of a 6 MB array"
    whole, _ = raw.load_npz(tmp_path / "big.npz")
    np.testing.assert_array_equal(whole, images[mixed_order(2000)])
    got, got_labels = raw.load_npz(tmp_path / "fortran.npz", limit=5)
    np.testing.assert_array_equal(got, images[:50][mixed_order(50)[:5]])
    np.testing.assert_array_equal(got_labels, labels[:50][mixed_order(50)[:5]])
    np.savez(tmp_path / "short_labels.npz", images=images[:10], labels=labels[:9])
    with pytest.raises(DataError, match="9 labels for 10 images"):
        raw.load_npz(tmp_path / "short_labels.npz", limit=3)


# ---------------------------------------------------------------- writer


def test_shard_round_trip_and_dataset_json(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (23, 5, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 23)
    info = write_shards(iter(images), labels, tmp_path / "ds", classes=list("abcd"), source="test", split="train",
                        shard_size=10, progress=False)
    record = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert record == {"format_version": 1, "count": 23, "resolution": 5, "channels": 3, "classes": list("abcd"),
                      "shards": ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"],
                      "source": "test", "split": "train"}
    got_images, got_labels = read_all(info)
    np.testing.assert_array_equal(got_images.transpose(0, 2, 3, 1), images)
    np.testing.assert_array_equal(got_labels, labels)
    with tarfile.open(info.shards[0]) as tar:
        assert tar.getnames()[:2] == ["000000000.cls", "000000000.png"]
    assert oct(os.stat(tmp_path / "ds").st_mode & 0o777) != oct(0o700)


def labeled_shards(folder: Path, bad: int) -> Path:
    """16 two-class 28x28 images in one shard; image 3's .cls says ``bad`` (-1: it has none)."""
    rng = np.random.default_rng(0)
    write_shards(rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), [i % 2 for i in range(16)], folder,
                 classes=["a", "b"], progress=False)
    shard = folder / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == "000000003.cls":
                if bad == -1:
                    continue
                data = str(bad).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return folder


@pytest.mark.parametrize("bad, expected", [(7, "label 7 is not one of dataset.json's 2 classes (0..1)"),
                                           (-5, "label -5 is not one of"), (-1, "no .cls label")])
def test_labels_outside_the_classes_are_damaged_samples(tmp_path, bad, expected):
    info = read_dataset_info(str(labeled_shards(tmp_path / "ds", bad)))
    with pytest.raises(DataError, match=rf"shard .*shard-000000.tar: key 000000003: {re.escape(expected)}.*skip_bad_samples"):
        read_shard(info.shards[0], resolution=28, channels=1, num_classes=2, need_labels=True)
    shard = read_shard(info.shards[0], resolution=28, channels=1, num_classes=2, need_labels=True, skip_bad=True)
    assert shard.skipped == 1 and len(shard.labels) == 15 and set(shard.labels.tolist()) == {0, 1}
    if bad == -1:  # an unlabeled sample is fine where no class is needed (an unconditional run)
        assert read_shard(info.shards[0], resolution=28, channels=1, num_classes=2).labels[3] == -1


def test_a_conditional_run_refuses_a_bad_label_in_one_line_or_skips_it(tmp_path, capsys):
    """A .cls beyond dataset.json's classes used to end in an IndexError traceback inside the projection head."""
    from test_cli_errors import one_line_error
    from test_every_option import TINY

    data = labeled_shards(tmp_path / "ds", 7)
    args = ["--config", "smoke", *TINY, "generator.conditional=true", "discriminator.conditional=true",
            "generator.arch=mlp", "discriminator.arch=mlp", f"data.path={data}", "eval.metrics=[]"]
    line = one_line_error(capsys, train_main, [*args, f"run.dir={tmp_path / 'run'}"])
    assert line.startswith("distgan.train: error: ") and "key 000000003: label 7" in line and "shard-000000.tar" in line
    assert train_main([*args, f"run.dir={tmp_path / 'skip'}", "data.skip_bad_samples=true"]) == 0
    assert (tmp_path / "skip" / "generator_ema.safetensors").is_file()


def test_write_shards_takes_a_torch_batch(tmp_path):
    """distgan.sample --shards passes generated images as a uint8 [N, C, H, W] tensor."""
    batch = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    info = write_shards(batch, None, tmp_path / "gen", source="distgan.sample", progress=False)
    images, labels = read_all(info)
    np.testing.assert_array_equal(images, batch.numpy())
    assert labels.tolist() == [-1] * 5 and info.classes is None


def test_refuses_overwrite_without_force(tmp_path, capsys):
    images = np.zeros((3, 4, 4), np.uint8)
    write_shards(images, None, tmp_path / "ds", progress=False)
    with pytest.raises(DataError, match="already exists; pass --force"):
        write_shards(images, None, tmp_path / "ds", progress=False)
    info = write_shards(np.ones((5, 4, 4), np.uint8), None, tmp_path / "ds", force=True, progress=False)
    assert info.count == 5 and json.loads((tmp_path / "ds" / "dataset.json").read_text())["count"] == 5
    assert prepare.main(["npz", "--src", "x.npz", "--out", str(tmp_path / "ds")]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_write_is_atomic_on_failure(tmp_path):
    def images():
        for i in range(12):
            yield np.zeros((4, 4), np.uint8) if i != 9 else np.zeros((5, 5), np.uint8)

    with pytest.raises(DataError, match="image 9"):
        write_shards(images(), None, tmp_path / "ds", shard_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder left behind


# ---------------------------------------------------------------- download


@pytest.fixture
def http_folder(tmp_path):
    """A threaded http.server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_download_verifies_checksums(tmp_path, http_folder, monkeypatch):
    www, url = http_folder
    rng = np.random.default_rng(4)
    write_idx_folder(www, rng.integers(0, 256, (5, 6, 6), dtype=np.uint8), np.arange(5) % 3, "train")
    write_idx_folder(www, rng.integers(0, 256, (2, 6, 6), dtype=np.uint8), np.arange(2), "t10k")
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in www.iterdir()}
    monkeypatch.setitem(dl.REMOTES, "mnist", dl.Remote("https://unused.invalid/", md5))
    monkeypatch.setenv(dl.MIRROR_ENV, url)
    cache = tmp_path / "cache"
    out = tmp_path / "shards"
    assert prepare.main(["mnist", "--download", "--src", str(cache), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == sorted(md5)  # no temporary files left
    assert json.loads((out / "dataset.json").read_text())["count"] == 5

    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"damaged")  # re-fetched because the checksum differs
    dl.download("mnist", cache, progress=False)
    assert dl.md5_of(cache / "t10k-labels-idx1-ubyte.gz") == md5["t10k-labels-idx1-ubyte.gz"]

    bad = dict(md5, **{"train-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(dl.REMOTES, "mnist", dl.Remote("https://unused.invalid/", bad))
    with pytest.raises(DataError, match="MD5 .* differs from the official 0{32}"):
        dl.download("mnist", tmp_path / "cache2", mirror=url, progress=False)
    assert not any(p.name.startswith("train-images") for p in (tmp_path / "cache2").iterdir())


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        open_source("fashion-mnist", tmp_path / "nothing")


# ---------------------------------------------------------------- CLI end to end


@pytest.mark.timeout(120)
def test_cli_fashion_mnist(tmp_path):
    require_fashion_mnist()
    out = tmp_path / "fm"
    result = subprocess.run(
        [sys.executable, "-m", "distgan.prepare", "fashion-mnist", "--out", str(out), "--limit", "1000",
         "--shard-size", "300"], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "dataset.json").read_text())
    assert record["count"] == 1000 and record["resolution"] == 28 and record["channels"] == 1
    assert record["shards"] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"] + record["shards"]
    images, labels = read_all(read_dataset_info(str(out)))
    expected, expected_labels = load_idx_split(FASHION_MNIST_DIR, "train")
    np.testing.assert_array_equal(images[:, 0], expected[:1000])
    np.testing.assert_array_equal(labels, expected_labels[:1000])
    again = subprocess.run([sys.executable, "-m", "distgan.prepare", "fashion-mnist", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=110)
    assert again.returncode == 2 and "--force" in again.stderr
