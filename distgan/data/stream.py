"""The training read stream: deterministic, resumable, endless batches from webdataset shards, and the
``DataSource`` protocol through which the trainer takes them (``ShardSource``, or an in-memory source in tests).

The stream of one rank is a sequence of blocks. Block ``b`` reads ``shards_per_block`` of the rank's shards
(taken in order from per-epoch shuffles of the rank's shard list, seeded by (seed, rank, epoch)), decodes
them into one uint8 array, and yields exactly ``batches_per_block`` batches drawn from it by a permutation
seeded by (seed, rank, b) (repeated when the block holds fewer samples than it yields). Every block yields
the same number of batches, so batch ``k`` is batch ``k % P`` of block ``k // P``: resuming at any batch
costs one block read, whatever ``k`` is. With ``num_workers`` W > 0 block ``b`` is made by worker
``(b - first_block) % W`` and the DataLoader hands items out round-robin, so the sequence does not depend on
W at all. Every rank runs forever at the same pace, so uneven shards cannot hang DDP. Shards are split over
ranks whole when their count divides by the world size, else by sample (every rank reads every shard and
keeps every world_size-th sample), so that every sample is shown equally often.

webdataset's own resampling (``resampled=True``) is not used: its position cannot be restored mid-stream.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import signal
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distgan.config import DataConfig
from distgan.data.errors import DataError
from distgan.data.shards import DatasetInfo, ShardData, count_samples, read_dataset_info, read_shard
from distgan.data.tar import check_url

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the block schedule


@dataclass
class StreamPlan:
    """Everything that fixes one rank's batch sequence; blocks are pure functions of it."""

    info: DatasetInfo
    shards: list[str]  # this rank's shards
    split_within: bool  # shards do not divide over the ranks: every rank reads all shards, keeps index % world == rank
    rank: int
    world_size: int
    seed: int
    batch_size: int
    shards_per_block: int
    batches_per_block: int
    hflip: bool
    skip_bad: bool
    allow_pipe: bool
    need_labels: bool = False  # a conditional run: every sample needs a class

    @classmethod
    def build(cls, cfg: DataConfig, info: DatasetInfo, batch_size: int, rank: int, world_size: int, seed: int,
              need_labels: bool = False) -> "StreamPlan":
        if not info.shards:
            raise DataError(f"data.path {cfg.path}: the dataset lists no shards")
        # Whole shards per rank only when they divide evenly: with 10 shards over 8 ranks, ranks holding 2 shards
        # would show each sample half as often as ranks holding 1 (every rank draws the same number of batches).
        # Otherwise every rank takes every world_size-th sample of every shard: equal shares, each sample as often.
        split_within = len(info.shards) % world_size != 0
        shards = list(info.shards) if split_within else info.shards[rank::world_size]
        # the same k on every rank (the smallest rank's shard count caps it), so all ranks share one schedule
        per_block = min(cfg.shards_per_block, len(shards) if split_within else len(info.shards) // world_size)
        count = info.count if info.count is not None else count_samples(info.shards[0], cfg.allow_pipe) * len(info.shards)
        per_shard = count / len(info.shards) / (world_size if split_within else 1)
        batches = max(1, int(per_block * per_shard) // batch_size)
        if per_block * per_shard < batch_size:
            log.warning("rank %d: a block holds about %d samples, fewer than a batch of %d: samples repeat within "
                        "batches (raise data.shards_per_block or use a smaller batch)", rank, per_block * per_shard, batch_size)
        return cls(info, shards, split_within, rank, world_size, seed % 2**63, batch_size, per_block, batches,
                   cfg.hflip, cfg.skip_bad_samples, cfg.allow_pipe, need_labels)

    def block_shards(self, block: int) -> list[str]:
        """Shards of ``block``: positions [block*k, (block+1)*k) of the endless per-epoch shuffles."""
        n, k = len(self.shards), self.shards_per_block
        first, last = block * k, (block + 1) * k
        picked = []
        for epoch in range(first // n, (last - 1) // n + 1):
            order = np.random.default_rng([self.seed, self.rank, 0, epoch]).permutation(n)
            lo, hi = max(first - epoch * n, 0), min(last - epoch * n, n)
            picked.extend(self.shards[i] for i in order[lo:hi])
        return picked

    def keep(self, index_in_shard: int) -> bool:
        return not self.split_within or index_in_shard % self.world_size == self.rank


class _ShardCache:
    """Decoded shards kept in memory (least recently used out first) up to a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget, self.items = budget_bytes, OrderedDict()

    def get(self, plan: StreamPlan, url: str) -> ShardData:
        if url in self.items:
            self.items.move_to_end(url)
            return self.items[url]
        data = read_shard(url, resolution=plan.info.resolution, channels=plan.info.channels,
                          keep=plan.keep if plan.split_within else None, skip_bad=plan.skip_bad,
                          allow_pipe=plan.allow_pipe, need_labels=plan.need_labels,
                          num_classes=len(plan.info.classes) if plan.info.classes else None)
        if data.skipped:
            log.debug("shard %s: skipped %d bad samples", url, data.skipped)
        self.items[url] = data
        while self.items and sum(d.nbytes for d in self.items.values()) > self.budget:
            self.items.popitem(last=False)
        return data


def read_block(plan: StreamPlan, block: int, cache: _ShardCache) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images uint8 [P*B, C, R, R], labels int64 [P*B], skipped samples) of one block."""
    shards = plan.block_shards(block)
    parts = [cache.get(plan, url) for url in shards]
    if sum(len(p.labels) for p in parts) == 0:  # e.g. every picked shard was bad: fall back to all shards
        shards = plan.shards
        parts = [cache.get(plan, url) for url in shards]
    total = sum(len(p.labels) for p in parts)
    if total == 0:
        raise DataError(f"rank {plan.rank}: no usable samples in its {len(plan.shards)} shards "
                        f"(first: {plan.shards[0]}); a dataset needs at least world_size samples")
    pool_images = np.concatenate([p.images for p in parts])
    pool_labels = np.concatenate([p.labels for p in parts])
    rng = np.random.default_rng([plan.seed, plan.rank, 1, block])
    need = plan.batches_per_block * plan.batch_size
    order = np.concatenate([rng.permutation(total) for _ in range(-(-need // total))])[:need]
    images, labels = pool_images[order], pool_labels[order]
    if plan.hflip:
        flip = rng.random(need) < 0.5
        images[flip] = images[flip][..., ::-1]
    return torch.from_numpy(images), torch.from_numpy(labels), sum(p.skipped for p in parts)


class _BlockDataset(IterableDataset):
    """Endless blocks from ``first_block`` on; DataLoader worker w of W makes blocks first + w, first + w + W, ..."""

    def __init__(self, plan: StreamPlan, first_block: int, cache_bytes: int):
        self.plan, self.first_block, self.cache_bytes = plan, first_block, cache_bytes

    def __iter__(self):
        worker = get_worker_info()
        w, num = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        cache = _ShardCache(self.cache_bytes)
        for block in itertools.count(self.first_block + w, num):
            yield read_block(self.plan, block, cache)


WORKER_NICENESS = 19  # the lowest priority: a data worker runs on the cores training leaves idle


def _yield_to_training(worker_id: int) -> None:
    """Ignore SIGINT and SIGTERM: a terminal, ``timeout`` and ``scancel`` signal the whole process group, and a
    worker that dies of it makes the main process fail ("DataLoader worker ... killed by signal") before it can
    checkpoint; the main process decides, and its workers end with it (PyTorch's worker loop exits when its parent
    has gone).

    Lower a data worker's CPU priority. When training's threads take every core (train.cpu_threads = cores, the
    CPU demo), a worker decoding shards at equal priority preempts one of them and every intra-op barrier waits for
    it (seen in the 2-core demo: 50 steps in 12-17 s instead of 1.9 s during the first epoch, while the worker
    decoded shards). At the lowest priority the worker decodes in the gaps, or while training waits for its block,
    which costs at most the decode itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # no nice() on this platform, or not permitted: run at equal priority
        pass


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the same arithmetic as the stream's numpy path (bit for bit); on the
    device for raw streams."""
    return images.float().div_(127.5).sub_(1.0)


BACKGROUND = -1.0  # pixel 0 after normalize_images: what data.pad adds around the real images


def pad_images(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Normalised images [B, C, R, R] with ``pad`` pixels of background on each side (``data.pad``); the same
    numbers whichever path (float from the stream, or uint8 normalised on the device) made ``images``."""
    return torch.nn.functional.pad(images, (pad, pad, pad, pad), value=BACKGROUND) if pad else images


SHM = "/dev/shm"


def shm_free_bytes(path: str = SHM) -> Optional[int]:
    """Free bytes of the shared-memory filesystem DataLoader workers hand their tensors through (None: none here)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_shared_memory(plan: StreamPlan, num_workers: int) -> None:
    """Refuse, naming /dev/shm and the fixes, a stream whose blocks in flight would not fit in shared memory: a worker
    that runs out dies with "Bus error" mid-run (Docker's default /dev/shm is 64 MB). In flight per process: one
    prefetched block per worker, plus the one being consumed; the processes of a node share /dev/shm."""
    free = shm_free_bytes()
    if free is None or num_workers == 0:
        return
    info = plan.info
    block = plan.batches_per_block * plan.batch_size * (info.channels * info.resolution ** 2 + 8)  # uint8 + int64 label
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = block * (num_workers + 1) * local
    if need > free:
        raise DataError(
            f"{SHM} has {free / 2**20:.0f} MiB free, but {local} process(es) x {num_workers} data workers pass blocks of "
            f"{block / 2**20:.0f} MiB through it (~{need / 2**20:.0f} MiB in flight): enlarge it (docker run --shm-size=2g, "
            "or a bigger tmpfs), or lower data.num_workers or data.shards_per_block")


def worker_context() -> Optional[str]:
    """forkserver on CUDA: workers must not be forked from a process with CUDA and NCCL state (torch's DDP docs);
    fork elsewhere, which starts workers fastest."""
    return "forkserver" if torch.cuda.is_available() else None


class BatchStream:
    """Endless iterator of (images float32 [B, C, R, R] in [-1, 1], labels int64 [B], -1 = unknown).

    ``raw``: images stay uint8 (in pinned memory when CUDA is present), for a copy a quarter the size that does
    not block the host, normalised on the device with :func:`normalize_images`.
    """

    def __init__(self, plan: StreamPlan, start_batch: int, num_workers: int, cache_bytes: int, raw: bool = False):
        self.plan, self.info, self.raw = plan, plan.info, raw
        self.batches_per_block = plan.batches_per_block
        first_block, self._offset = divmod(start_batch, plan.batches_per_block)
        dataset = _BlockDataset(plan, first_block, cache_bytes)
        if num_workers > 0:
            # batch_size=None: items are whole blocks; prefetch 1 block per worker bounds memory, and
            # the stream is endless, so workers never need to persist across epochs.
            check_shared_memory(plan, num_workers)
            loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=1,
                                worker_init_fn=_yield_to_training, multiprocessing_context=worker_context())
            self._blocks = iter(loader)
        else:
            self._blocks = iter(dataset)
        self._block = first_block - 1
        self._images: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self.skipped_samples = 0  # bad samples skipped in the blocks delivered so far

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None or self._offset >= self.batches_per_block:
            if self._images is not None:
                self._offset = 0
            try:
                self._images, self._labels, skipped = next(self._blocks)
            except Exception:
                self.close()  # a failed stream is finished; stopping workers now beats a slow stop in gc
                raise
            self._block += 1
            if skipped:
                self.skipped_samples += skipped
                log.warning("data block %d: skipped %d bad samples (%d so far)", self._block, skipped, self.skipped_samples)
        lo = self._offset * self.plan.batch_size
        hi = lo + self.plan.batch_size
        self._offset += 1
        if self.raw:
            images = self._images[lo:hi]
            return (images.pin_memory() if torch.cuda.is_available() else images), self._labels[lo:hi]
        # numpy, not torch: tiny torch ops pay for waking the intra-op thread pool (measured 40x slower)
        images = self._images[lo:hi].numpy().astype(np.float32)
        images /= 127.5
        images -= 1.0
        return torch.from_numpy(images), self._labels[lo:hi]

    def close(self) -> None:
        """Stop the DataLoader workers now (they also stop when the stream is garbage collected)."""
        shutdown = getattr(self._blocks, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def make_batch_iterator(
    cfg: DataConfig, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int = 0, raw: bool = False,
    need_labels: bool = False,
) -> BatchStream:
    """Endless per-rank batches; ``start_batch=k`` yields exactly what a fresh stream yields from batch k on.

    The sequence is a pure function of (shards, seed, rank, world_size, batch_size, shards_per_block);
    it does not depend on num_workers. ``batch_size`` is the per-rank batch.
    """
    if batch_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise DataError(f"make_batch_iterator: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                        f"start_batch={start_batch}: need batch_size >= 1, 0 <= rank < world_size, start_batch >= 0")
    info = read_dataset_info(cfg.path, allow_pipe=cfg.allow_pipe)
    plan = StreamPlan.build(cfg, info, batch_size, rank, world_size, seed, need_labels)
    missing = [s for s in plan.shards if check_url(s, cfg.allow_pipe, f"shard {s}") == "" and not os.path.isfile(s)]
    if missing:
        raise DataError(f"shard {missing[0]}: file not found ({len(missing)} of rank {rank}'s shards missing); "
                        "re-run python -m distgan.prepare or fix data.path")
    cache_bytes = int(cfg.cache_mb) * 2**20
    log.info("data: %s, rank %d/%d: %d shards, %d batches of %d per block", cfg.path, rank, world_size,
             len(plan.shards), plan.batches_per_block, batch_size)
    return BatchStream(plan, start_batch, cfg.num_workers, cache_bytes, raw)


# ---------------------------------------------------------------- what the trainer consumes


class DataSource(Protocol):
    """Real batches for the trainer: the shards, or a deterministic in-memory source in tests."""

    resolution: int
    channels: int
    classes: Optional[list[str]]

    def batches(self, batch_size: int, rank: int, world_size: int, seed: int,
                start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class ShardSource:
    """The webdataset shards named by ``data.path``; ``raw``: uint8 images (see :class:`BatchStream`);
    ``need_labels``: a conditional run's, whose every sample needs a class."""

    def __init__(self, data_cfg: DataConfig, raw: bool = False, need_labels: bool = False):
        self.cfg, self.raw, self.need_labels = data_cfg, raw, need_labels
        self.info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
        self.resolution, self.channels, self.classes = self.info.resolution, self.info.channels, self.info.classes

    def batches(self, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int) -> BatchStream:
        return make_batch_iterator(self.cfg, batch_size, rank, world_size, seed, start_batch, self.raw,
                                   self.need_labels)
