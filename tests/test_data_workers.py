"""How the data workers start: forkserver on CUDA (never forked from a process holding CUDA and NCCL state), and a
clear error naming /dev/shm, before any worker starts, when the blocks in flight would not fit there."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distgan.config import DataConfig
from distgan.data import stream
from distgan.data.errors import DataError
from distgan.data.stream import make_batch_iterator
from tests.test_data_pipeline import make_dataset, same, take


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", n=120, shard_size=20)  # 6 shards of 4x4x1


def test_too_little_shared_memory_is_refused_before_workers_start(dataset, monkeypatch):
    """Blocks of 2 shards x 20 samples -> 5 batches of 8 = 40 x (16 pixels + 8 label bytes) = 960 bytes; 2 workers
    and the block in use: 2,880 bytes in flight. 2,879 free is refused, 2,880 is enough."""
    cfg = DataConfig(path=str(dataset), num_workers=2, shards_per_block=2)
    started = []
    monkeypatch.setattr(stream, "DataLoader", lambda *a, **k: started.append(1) or iter(()))
    monkeypatch.setattr(stream, "shm_free_bytes", lambda path=stream.SHM: 2879)
    with pytest.raises(DataError, match=r"/dev/shm has 0 MiB free.*--shm-size.*data.num_workers"):
        make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=0)
    assert not started
    monkeypatch.setattr(stream, "shm_free_bytes", lambda path=stream.SHM: 2880)
    make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=0)
    assert started == [1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on the node share it
    with pytest.raises(DataError, match="2 process"):
        make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=0)


def test_workers_start_with_forkserver_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stream.worker_context() == "forkserver"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stream.worker_context() is None


@pytest.mark.timeout(120)
def test_forkserver_workers_give_the_same_batches(dataset, monkeypatch):
    cfg = DataConfig(path=str(dataset), num_workers=0, shards_per_block=2)
    expected = take(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=3), 12)
    monkeypatch.setattr(stream, "worker_context", lambda: "forkserver")
    cfg.num_workers = 2
    assert same(take(make_batch_iterator(cfg, 8, rank=0, world_size=1, seed=3), 12), expected)
