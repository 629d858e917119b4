"""The read stream: determinism, resume, rank splitting, foreign shards, errors."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from distgan.config import DataConfig
from distgan.data import stream
from distgan.data.errors import DataError
from distgan.data.shards import encode_png, read_dataset_info, read_shard, write_shards
from distgan.data.stream import make_batch_iterator
from distgan.data.tar import tar_members

RES = 4


def id_images(start: int, n: int, channels: int = 1) -> np.ndarray:
    """Images whose id is readable from mirror-symmetric pixels (so flips keep it) plus random content."""
    rng = np.random.default_rng(start)
    images = rng.integers(0, 256, (n, RES, RES, channels), dtype=np.uint8)
    ids = np.arange(start, start + n)
    for col in (0, RES - 1):
        images[:, 0, col, 0], images[:, 1, col, 0] = ids % 256, ids // 256
    return images


def ids_of(batch: torch.Tensor) -> list[int]:
    pixels = torch.round((batch + 1) * 127.5).to(torch.int64)
    return (pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 1, 0]).tolist()


def make_dataset(folder: Path, n: int, shard_size: int, channels: int = 1) -> Path:
    images = id_images(0, n, channels)
    write_shards(images, np.arange(n) % 7, folder, shard_size=shard_size, progress=False)
    return folder


def take(stream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=120, shard_size=20)  # 6 shards


def test_batches_are_the_written_images(dataset):
    cfg = DataConfig(path=str(dataset), num_workers=0, shards_per_block=6)
    stream = make_batch_iterator(cfg, batch_size=40, rank=0, world_size=1, seed=0)
    assert stream.batches_per_block == 3  # 6 shards x 20 samples / 40
    batches = take(stream, 3)  # one block = a permutation of all 120 samples
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert images.shape == (120, 1, RES, RES) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    ids = ids_of(images)
    assert sorted(ids) == list(range(120)) and ids != list(range(120))
    expected = id_images(0, 120)
    pixels = torch.round((images + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, expected[ids])  # exact round trip through PNG and [-1, 1]
    assert labels.tolist() == [i % 7 for i in ids]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_matches_fresh_stream(dataset, workers):
    cfg = DataConfig(path=str(dataset), num_workers=0, shards_per_block=2, hflip=True)
    fresh = take(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=5), 16)  # 5 batches per block
    cfg.num_workers = workers
    resumed = take(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=5, start_batch=7), 9)
    assert same(fresh[7:], resumed)
    if workers:
        assert same(fresh[:6], take(make_batch_iterator(cfg, 8, 0, 1, seed=5), 6))  # independent of workers
    other_seed = take(make_batch_iterator(DataConfig(path=str(dataset), num_workers=0), 8, 0, 1, seed=6), 2)
    assert not same(fresh[:2], other_seed)


def test_resume_cost_does_not_depend_on_position(dataset, monkeypatch):
    reads = []
    original = stream.read_shard
    monkeypatch.setattr(stream, "read_shard", lambda url, **kw: reads.append(url) or original(url, **kw))
    cfg = DataConfig(path=str(dataset), num_workers=0, shards_per_block=2)
    x, _ = next(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=1, start_batch=10**9 + 3))
    assert x.shape == (8, 1, RES, RES) and len(reads) == 2


def test_hflip_mirrors_about_half(dataset):
    plain = take(make_batch_iterator(DataConfig(path=str(dataset), num_workers=0, shards_per_block=6), 40, 0, 1, 3), 3)
    flipped = take(make_batch_iterator(DataConfig(path=str(dataset), num_workers=0, shards_per_block=6, hflip=True),
                                       40, 0, 1, 3), 3)
    a, b = torch.cat([p[0] for p in plain]), torch.cat([f[0] for f in flipped])
    assert ids_of(a) == ids_of(b)  # same order; only the flips differ
    mirrored = [torch.equal(b[i], a[i].flip(-1)) and not torch.equal(b[i], a[i]) for i in range(len(a))]
    unchanged = [torch.equal(b[i], a[i]) for i in range(len(a))]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and 30 <= sum(mirrored) <= 90


@pytest.mark.parametrize("shard_size", [20, 120])  # 6 shards (split by shard) and 1 shard (split by index)
def test_ranks_get_disjoint_samples(tmp_path, shard_size):
    folder = make_dataset(tmp_path / "ds", n=120, shard_size=shard_size)
    seen = []
    for rank in (0, 1):
        stream = make_batch_iterator(DataConfig(path=str(folder), num_workers=0), 10, rank, 2, seed=0)
        seen.append({i for x, _ in take(stream, 5 * stream.batches_per_block) for i in ids_of(x)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(120))


@pytest.mark.timeout(120)
def test_one_shard_two_ranks_two_workers(tmp_path):
    folder = make_dataset(tmp_path / "ds", n=30, shard_size=30)
    counts = []
    for rank in (0, 1):
        stream = make_batch_iterator(DataConfig(path=str(folder), num_workers=2), 4, rank, 2, seed=0)
        batches = take(stream, 3 * stream.batches_per_block + 1)
        assert all(x.shape == (4, 1, RES, RES) for x, _ in batches)
        assert {i % 2 for x, _ in batches for i in ids_of(x)} == {rank}
        counts.append(stream.batches_per_block)
    assert counts == [3, 3]  # 15 samples per rank / 4


@pytest.mark.timeout(120)
def test_data_workers_run_at_the_lowest_priority(dataset):
    """A worker decoding shards must not take cores from training's threads (stream.WORKER_NICENESS)."""
    psutil = pytest.importorskip("psutil")
    ours, before = os.nice(0), {p.pid for p in psutil.Process().children()}  # e.g. a test cluster's daemons
    batches = make_batch_iterator(DataConfig(path=str(dataset), num_workers=2), 10, 0, 1, seed=0)
    try:
        next(batches)
        workers = [p for p in psutil.Process().children() if p.pid not in before]
        assert len(workers) == 2 and {w.nice() for w in workers} == {min(19, ours + stream.WORKER_NICENESS)}
    finally:
        batches.close()
    assert os.nice(0) == ours  # the training process keeps its priority


def test_foreign_shards_without_dataset_json(tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    rgb = id_images(0, 9, channels=3)
    with wds.TarWriter(str(folder / "a.tar")) as sink:  # PNG with labels
        for i in range(3):
            sink.write({"__key__": f"a{i}", "png": encode_png(rgb[i]), "cls": str(i).encode()})
    with wds.TarWriter(str(folder / "b.tar")) as sink:  # npy in HWC and CHW, no labels
        for i in range(3, 6):
            array = rgb[i] if i % 2 else rgb[i].transpose(2, 0, 1)
            sink.write({"__key__": f"dir/b{i}", "npy": array})
    with wds.TarWriter(str(folder / "c.tar")) as sink:  # JPEG (lossy), labels
        for i in range(6, 9):
            buffer = io.BytesIO()
            Image.fromarray(np.full((RES, RES, 3), 25 * i, np.uint8)).save(buffer, format="JPEG", quality=95)
            sink.write({"__key__": f"c{i}", "jpg": buffer.getvalue(), "cls": b"1"})
    info = read_dataset_info(str(folder))
    assert (info.count, info.resolution, info.channels, len(info.shards)) == (None, RES, 3, 3)
    assert len(read_dataset_info(str(folder / "{a,b,c}.tar")).shards) == 3
    stream = make_batch_iterator(DataConfig(path=str(folder / "{a,b}.tar"), num_workers=0, shards_per_block=2), 6, 0, 1, 0)
    x, y = take(stream, 1)[0]
    by_id = dict(zip(ids_of(x), y.tolist()))
    assert by_id == {0: 0, 1: 1, 2: 2, 3: -1, 4: -1, 5: -1}
    pixels = torch.round((x + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(pixels, rgb[ids_of(x)])
    x, y = take(make_batch_iterator(DataConfig(path=str(folder / "c.tar"), num_workers=0), 3, 0, 1, 0), 1)[0]
    assert x.shape == (3, 3, RES, RES) and y.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- errors


def test_missing_shard_names_it(tmp_path):
    folder = make_dataset(tmp_path / "ds", n=40, shard_size=10)
    os.remove(folder / "shard-000002.tar")
    with pytest.raises(DataError, match="shard-000002.tar: file not found"):
        make_batch_iterator(DataConfig(path=str(folder), num_workers=0), 4, 0, 1, 0)


def test_corrupt_shard_names_shard_and_key(tmp_path):
    folder = make_dataset(tmp_path / "ds", n=20, shard_size=20)
    shard = folder / "shard-000000.tar"
    original = shard.read_bytes()
    data = bytearray(original)
    data[6 * 1024 + 100] ^= 0xFF  # the 7th header (000000003.cls): each member is 512 header + 512 content
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-000000.tar: corrupt tar .* after member '000000002.png'"):
        next(make_batch_iterator(DataConfig(path=str(folder), num_workers=0), 4, 0, 1, 0))
    shard.write_bytes(original[:8 * 1024 + 300])  # cut inside a header
    with pytest.raises(DataError, match=r"shard-000000.tar: truncated tar: a header after '000000003.png'"):
        next(make_batch_iterator(DataConfig(path=str(folder), num_workers=0), 4, 0, 1, 0))
    shard.write_bytes(original[:7 * 1024 + 520])  # cut inside the content of 000000003.png
    with pytest.raises(DataError, match=r"shard-000000.tar: truncated tar: member after '000000003.cls'"):
        next(make_batch_iterator(DataConfig(path=str(folder), num_workers=0), 4, 0, 1, 0))


def bad_samples_shard(folder: Path) -> Path:
    """12 good 4x4 gray PNGs, undecodable bytes (record 3, key bad-bytes) and a 5x5 image (key bad-shape)."""
    folder.mkdir()
    images = id_images(0, 12)
    with wds.TarWriter(str(folder / "mixed.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"good{i:02d}", "png": encode_png(images[i]), "cls": b"0"})
            if i == 2:
                sink.write({"__key__": "bad-bytes", "png": b"\x89PNG not really"})
            if i == 8:
                sink.write({"__key__": "bad-shape", "png": encode_png(np.zeros((5, 5, 1), np.uint8))})
    return folder


@pytest.mark.timeout(120)
def test_bad_samples_fail_or_are_skipped(tmp_path):
    folder = bad_samples_shard(tmp_path / "mixed")
    for workers in (0, 1):  # the message survives the trip from a DataLoader worker
        with pytest.raises(DataError, match=r"mixed.tar: key bad-bytes: cannot decode .png"):
            next(make_batch_iterator(DataConfig(path=str(folder), num_workers=workers), 4, 0, 1, 0))
    with pytest.raises(DataError, match=r"mixed.tar: key bad-shape: image is 5x5x1 .* dataset is 4x4x1"):
        read_shard(str(folder / "mixed.tar"), resolution=4, channels=1, keep=lambda index: index != 3)
    stream = make_batch_iterator(DataConfig(path=str(folder), num_workers=0, skip_bad_samples=True), 4, 0, 1, 0)
    batches = take(stream, 2 * stream.batches_per_block)
    assert stream.batches_per_block == 3  # 14 records (count from the tar) // 4
    assert {i for x, _ in batches for i in ids_of(x)} == set(range(12))
    assert stream.skipped_samples == 4  # 2 bad samples in each of the 2 blocks


def test_empty_shard_and_pipe_urls_are_refused(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    wds.TarWriter(str(folder / "empty.tar")).close()
    with pytest.raises(DataError, match="empty.tar: no samples"):
        read_dataset_info(str(folder))
    with pytest.raises(DataError, match="allow_pipe"):
        make_batch_iterator(DataConfig(path=f"pipe:cat {folder}/empty.tar"), 4, 0, 1, 0)
    with pytest.raises(DataError, match="no dataset.json and no \\*.tar"):
        read_dataset_info(str(tmp_path))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_agrees_with_tarfile(fmt):
    """distgan's fast tar parser gives the same members as tarfile, long names and pax headers included."""
    rng = np.random.default_rng(fmt)
    names = ["a.png", "d" * 90 + "/" + "e" * 60 + ".png", "\u00fcn\u00ef.cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append("x" * 150 + ".npy")  # a GNU long name / pax path
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            payload = rng.integers(0, 256, 700 * i + 3, dtype=np.uint8).tobytes()
            info.size, info.mtime = len(payload), 1.5  # a float mtime makes pax headers
            tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(tar_members(data, "test.tar")) == expected and len(expected) == len(names)
