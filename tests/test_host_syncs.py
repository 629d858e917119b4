"""No host sync and no collective inside a training step: they happen only at the sync points (log, samples,
evaluation, checkpoint, end).

On a GPU every read of a device value by the host (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``) waits
for the queue to drain. On CPU they cost nothing, so they are counted instead: the calls are instrumented while
the real Trainer trains, each noted with the step and whether it came from inside a step (the phases, the
data, the EMA update) or from the loop between steps. The collectives (Accelerate's reduce and gather, and
distgan's stop vote) are counted the same way.
"""
from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

import distgan.trainer as trainer_module
from distgan.config import load_config
from distgan.trainer import StepHealth, Trainer
from tests.distributed.support import MemorySource

LOG_EVERY, STEPS = 4, 12
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def instrumented_fit(trainer: Trainer, monkeypatch) -> list[tuple[str, int, bool]]:
    """Train; return (call, step, inside a step) for every host sync and collective after the first phase."""
    calls: list[tuple[str, int, bool]] = []
    where = {"started": False, "inside": False}

    def note(name: str) -> None:
        if where["started"]:
            calls.append((name, trainer.state.step, where["inside"]))

    def counted(name, original):
        def wrapper(*args, **kwargs):
            note(name)
            return original(*args, **kwargs)
        return wrapper

    def inside(original):
        def wrapper(*args, **kwargs):
            where["started"], where["inside"] = True, True
            try:
                return original(*args, **kwargs)
            finally:
                where["inside"] = False
        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in ("reduce", "gather"):
        monkeypatch.setattr(Accelerator, name, counted(name, getattr(Accelerator, name)))
    monkeypatch.setattr(trainer_module.StopVote, "__call__", counted("stop_vote", trainer_module.StopVote.__call__))
    trainer._run_phase = inside(trainer._run_phase)
    trainer._next_real = inside(trainer._next_real)
    trainer.ema.update = inside(trainer.ema.update)
    trainer.fit()
    return calls


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides", [
    (), ("loss.penalty=r1",), ("fp16",),
    ("augment.policy=[translation,cutout,color]", "augment.adaptive=true", "augment.interval=3"),
], ids=["default", "r1", "fp16-scaler", "adaptive-augment"])
def test_no_host_sync_or_collective_between_log_steps(tmp_path, monkeypatch, overrides):
    fp16 = overrides == ("fp16",)
    cfg = load_config("smoke", [f"run.dir={tmp_path}", f"train.steps={STEPS}", f"log.every={LOG_EVERY}",
                                "log.sample_every=1000", "checkpoint.every=1000", "log.gif=false",
                                "train.cpu_threads=1", *(() if fp16 else overrides)])
    trainer = Trainer(cfg, source=MemorySource())
    if fp16:  # the fp16 tail as on a GPU (see test_fp16_scaler.py)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
        trainer.health = StepHealth(trainer.accelerator.device, fp16=True)
    calls = instrumented_fit(trainer, monkeypatch)
    in_step = [c for c in calls if c[2]]
    assert not in_step, f"host syncs inside a training step: {in_step[:10]}"
    between = [c for c in calls if c[1] % LOG_EVERY and c[0] != "stop_vote"]
    assert not between, f"host syncs or collectives between log steps: {between[:10]}"
    # the stop check (an all-reduce read one check later on N processes) runs every train.stop_check_every steps, nothing else
    every = cfg.train.stop_check_every
    assert {c[1] for c in calls if c[0] == "stop_vote"} == set(range(every, STEPS, every))
    assert any(c[1] == LOG_EVERY for c in calls), "the instrumentation saw nothing: the test would prove nothing"
