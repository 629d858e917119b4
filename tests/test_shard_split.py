"""Shards that do not divide over the ranks: every sample is still shown equally often.

Every rank draws the same number of batches per step (DDP needs equal steps). Split by whole shards, 12 shards
over 5 ranks would give ranks 0-1 three shards and ranks 2-4 two, so the samples of ranks 2-4 would be shown
1.5 times as often. The ranks are simulated in one process with the real stream (make_batch_iterator).
"""
from __future__ import annotations

from collections import Counter

from distgan.config import DataConfig
from distgan.data.stream import make_batch_iterator
from tests.test_data_pipeline import ids_of, make_dataset, take

SHARDS, SHARD_SIZE, WORLD, BATCH = 12, 50, 5, 4


def test_uneven_shards_show_every_sample_equally_often(tmp_path):
    folder = make_dataset(tmp_path / "ds", n=SHARDS * SHARD_SIZE, shard_size=SHARD_SIZE)
    cfg = DataConfig(path=str(folder), num_workers=0, shards_per_block=2)
    streams = [make_batch_iterator(cfg, BATCH, rank, WORLD, seed=3) for rank in range(WORLD)]
    # as in training: every rank draws the same number of batches (here, rank 0's two passes over its shards)
    plan = streams[0].plan
    steps = 2 * (len(plan.shards) // plan.shards_per_block) * plan.batches_per_block
    shown = Counter(i for s in streams for x, _ in take(s, steps) for i in ids_of(x))
    assert set(shown) == set(range(SHARDS * SHARD_SIZE)), "some samples were never shown"
    low, high = min(shown.values()), max(shown.values())
    assert high <= 1.01 * low, f"samples shown between {low} and {high} times"
