"""What ranks wait for and what they share, beyond the training step: rank 0's lone work waits on a gloo group made
before it starts; the stop vote never blocks a check; only batch-norm statistics are averaged over ranks."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distgan import distributed
from distgan.augment import Augmented
from distgan.config import AugmentConfig, DiscriminatorConfig, GeneratorConfig
from distgan.nn import build_discriminator, build_generator
from distgan.stop import StopVote


class TwoRanks:
    num_processes, is_main_process = 2, True


def test_rank_zeros_work_runs_after_a_gloo_group_with_the_long_timeout_exists(monkeypatch):
    events = []
    monkeypatch.setattr(dist, "new_group", lambda **kw: events.append(("new_group", kw)) or "group")
    monkeypatch.setattr(dist, "broadcast_object_list", lambda values, src, group: events.append(("broadcast", group)))
    monkeypatch.setattr(dist, "barrier", lambda group: events.append(("barrier", group)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda group: events.append(("destroy", group)))
    result = distributed.broadcast_from_main(TwoRanks(), lambda: events.append(("work",)) or 42, timeout_s=7200)
    assert result == 42
    assert [e[0] for e in events] == ["new_group", "work", "broadcast", "barrier", "destroy"]
    assert events[0][1] == {"backend": "gloo", "timeout": timedelta(seconds=7200)}


def test_only_batch_norm_statistics_are_averaged():
    """Not spectral norm's u, v (identical on every rank; a mean of unit vectors is not one), nor augmentation's p."""
    torch.manual_seed(0)
    G = build_generator(GeneratorConfig(arch="dcgan", width=8, z_dim=4, norm="batch"), 28, 1)
    D = Augmented(build_discriminator(DiscriminatorConfig(arch="dcgan", width=8, norm="spectral"), 28, 1),
                  AugmentConfig(policy=["color"]))
    averaged = {id(b) for b in distributed.statistics_buffers(G, D)}
    names = {name for module in (G, D) for name, b in module.named_buffers() if id(b) in averaged}
    assert names and all(name.endswith(("running_mean", "running_var")) for name in names)
    assert len(names) == sum(name.endswith(("running_mean", "running_var")) for name, _ in G.named_buffers())
    assert not any(id(b) in averaged for name, b in D.named_buffers())


def _vote(rank: int, store_dir: str, checks: list[bool], answers, started: str) -> None:
    store = dist.FileStore(os.path.join(store_dir, "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    vote = StopVote(torch.device("cpu"), 2)
    seen = []
    for i, local in enumerate(checks):
        if rank == 1 and i == 0:  # rank 1 joins the first check only once rank 0 has returned from it
            deadline = time.monotonic() + 60
            while not Path(started).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        seen.append(vote(local))
        if rank == 0 and i == 0:
            Path(started).touch()
    answers.put((rank, seen))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_the_stop_vote_answers_one_check_later_without_waiting(tmp_path):
    """Rank 0 returns from its first check before rank 1 has even started it (a blocking all-reduce would deadlock
    here until the timeout); rank 1 asks at check 1 and both ranks stop at check 2, together."""
    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    started = str(tmp_path / "rank0-returned")
    checks = {0: [False, False, False, False], 1: [False, True, False, False]}
    procs = [ctx.Process(target=_vote, args=(rank, str(tmp_path), checks[rank], answers, started)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = dict(answers.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results[0] == results[1] == [False, False, True, False]
