"""The mission's command on a fresh machine: cifar10.yaml (data.prepare: cifar10) downloads its archive from the
official address (here a local server standing in for it), checks the checksum, writes the shards, then trains."""
import hashlib
import json
import os

import pytest

from distgan.config import ConfigError, load_config
from distgan.data import download as dl
from distgan.api import fit
from distgan.trainer import Trainer
from test_data import http_folder, make_cifar  # noqa: F401 (http_folder is a fixture)

TINY = ["train.steps=1", "train.batch_size=8", "generator.width=8", "discriminator.width=8", "data.num_workers=0",
        "data.shards_per_block=1", "log.every=1", "log.sample_every=1", "log.n_samples=4", "log.wandb=false",
        "log.gif=false", "log.progress_bar=false"]


@pytest.fixture
def cifar_server(http_folder, tmp_path, monkeypatch):
    """A CIFAR-10 archive served at a local mirror; REMOTES carries its checksum, the cache is empty."""
    www, url = http_folder
    archive, _ = make_cifar(tmp_path / "raw", per_batch=4)
    (www / archive.name).write_bytes(archive.read_bytes())
    serve_from_mirror(monkeypatch, tmp_path, "cifar10", www, url)
    return www / archive.name


def serve_from_mirror(monkeypatch, tmp_path, source: str, www, url: str) -> None:
    """SOURCE's official files become the files in WWW (their MD5s the official ones), served at URL; the
    download cache goes under tmp_path."""
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in www.iterdir()}
    monkeypatch.setitem(dl.REMOTES, source, dl.Remote("https://unused.invalid/", md5))
    monkeypatch.setenv(dl.MIRROR_ENV, url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.timeout(180)
def test_cifar10_config_prepares_its_data_on_first_use(cifar_server, tmp_path):
    data = tmp_path / "data" / "cifar10"
    cfg = load_config("cifar10", [*TINY, f"data.path={data}", f"run.dir={tmp_path / 'run'}"])
    assert cfg.data.prepare == "cifar10"
    fit(cfg)
    info = json.loads((data / "dataset.json").read_text())
    assert info["count"] == 20 and info["resolution"] == 32 and info["channels"] == 3
    assert (tmp_path / "cache" / "distgan" / "cifar10" / cifar_server.name).is_file()
    assert (tmp_path / "run" / "generator_ema.safetensors").is_file()


@pytest.mark.timeout(120)
def test_a_wrong_checksum_stops_before_anything_is_written(cifar_server, tmp_path):
    cifar_server.write_bytes(cifar_server.read_bytes()[:-10] + b"0123456789")  # the server sends another file
    data = tmp_path / "data" / "cifar10"
    cfg = load_config("cifar10", [*TINY, f"data.path={data}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="MD5 .* differs from the official"):
        fit(cfg)
    assert not data.exists() and not os.path.exists(tmp_path / "run")


def test_an_unknown_source_is_named():
    with pytest.raises(ConfigError, match=r"data.prepare = 'cifar100': not a distgan.prepare source"):
        fit(load_config("smoke", ["data.prepare=cifar100", "data.path=/nonexistent-data"]))


def idx_gz(path, magic: int, dims: tuple[int, ...], data: bytes) -> None:
    """An IDX file (big-endian magic, dimensions, uint8 data), gzipped, as MNIST's mirror serves it."""
    import gzip
    import struct

    path.write_bytes(gzip.compress(struct.pack(f">{1 + len(dims)}I", magic, *dims) + data))


@pytest.mark.timeout(180)
def test_mnist_config_prepares_its_data_on_first_use(http_folder, tmp_path, monkeypatch):
    """mnist.yaml (data.prepare: mnist) on a machine without the data: the four IDX files come from the mirror,
    checksummed, then shards, then training."""
    import numpy as np

    www, url = http_folder
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("t10k", 8)):
        idx_gz(www / f"{split}-images-idx3-ubyte.gz", 0x803, (n, 28, 28),
               rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8).tobytes())
        idx_gz(www / f"{split}-labels-idx1-ubyte.gz", 0x801, (n,), (np.arange(n) % 10).astype(np.uint8).tobytes())
    serve_from_mirror(monkeypatch, tmp_path, "mnist", www, url)
    data = tmp_path / "data" / "mnist"
    cfg = load_config("mnist", [*TINY, f"data.path={data}", f"run.dir={tmp_path / 'run'}"])
    assert cfg.data.prepare == "mnist"
    fit(cfg)
    info = json.loads((data / "dataset.json").read_text())
    assert info["count"] == 24 and info["resolution"] == 28 and info["channels"] == 1
    assert (tmp_path / "run" / "generator_ema.safetensors").is_file()


def test_building_a_trainer_does_no_first_use_work(tmp_path):
    """First-use work belongs to the command (distgan.fit / distgan.train), not to constructing a Trainer: a Trainer
    on a data.path that data.prepare has not made yet refuses, naming what makes it, and writes nothing."""
    data = tmp_path / "data" / "mnist"
    cfg = load_config("mnist", [*TINY, f"data.path={data}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"holds no shards yet: data.prepare=mnist makes them on first use"):
        Trainer(cfg)
    assert not data.exists() and not (tmp_path / "run").exists()
