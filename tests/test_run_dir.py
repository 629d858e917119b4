"""Nothing lost: the run dir's lock, no fresh start over results, checkpoint integrity and lineage, config history.

Each test reproduces a way a run used to lose data or resume wrongly (see the README's guarantees).
"""
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from distgan import checkpoint as ck
from distgan.checkpoint import TrainState, find_resume_path, list_checkpoints, save_checkpoint
from distgan.config import Config, ConfigError, load_config
from distgan.rundir import RunDirLock, _process_start, config_changes
from distgan.trainer import Trainer
from compare import assert_same_bytes, assert_same_text
from tests.distributed.support import MemorySource

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)

QUIET = ["log.every=1", "log.sample_every=1000", "log.gif=false"]


def _cfg(run_dir, *overrides):
    return load_config("smoke", [f"run.dir={run_dir}", *QUIET, *overrides])


def _train(run_dir, *overrides, resume=None):
    trainer = Trainer(_cfg(run_dir, *overrides), source=MemorySource(), resume=resume)
    trainer.fit()
    return trainer


def _steps(run_dir):
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


# ---------------------------------------------------------------- fresh starts and the lock


def test_fresh_start_refuses_a_run_dir_with_results_but_no_checkpoints(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss_d": 1.0}\n')
    (tmp_path / "generator_ema.safetensors").write_bytes(b"an earlier export")
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, generator_ema.safetensors\)"):
        Trainer(_cfg(tmp_path), source=MemorySource())
    assert_same_text((tmp_path / "metrics.jsonl").read_text(), '{"step": 1, "loss_d": 1.0}\n', "metrics.jsonl")
    assert_same_bytes((tmp_path / "generator_ema.safetensors").read_bytes(), b"an earlier export", "the export")
    assert not (tmp_path / ".lock").exists()  # a refused start leaves no lock behind


def test_resume_auto_without_a_checkpoint_keeps_earlier_results_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss_d": 1.0}\n')
    _train(tmp_path, "train.steps=2", resume="auto")
    (aside,) = tmp_path.glob("previous-*")
    assert_same_text((aside / "metrics.jsonl").read_text(), '{"step": 1, "loss_d": 1.0}\n', "metrics.jsonl")
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_auto_with_only_damaged_checkpoints_sets_them_aside(tmp_path, caplog):
    _train(tmp_path, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=10")
    for path in list_checkpoints(tmp_path / "checkpoints"):
        with open(path / "G.safetensors", "r+b") as fh:
            fh.write(b"\0" * 16)  # every checkpoint damaged
    with caplog.at_level(logging.WARNING):
        _train(tmp_path, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=2", resume="auto")
    assert "no intact checkpoint" in caplog.text
    (aside,) = tmp_path.glob("previous-*")
    assert _steps_in(aside / "checkpoints") == [f"step-{s:08d}" for s in (1, 2, 3, 4)]  # kept, named
    assert _steps(tmp_path) == ["step-00000001", "step-00000002"]  # not pruned for the old branch's steps 3 and 4
    assert find_resume_path("auto", tmp_path).name == "step-00000002"


def test_a_live_lock_is_refused_and_a_dead_one_is_taken_over(tmp_path, caplog):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = RunDirLock(tmp_path)
        holder._mine = lambda: {"pid": other.pid, "pid_start": _process_start(other.pid), "host": socket.gethostname(),
                                "slurm_job": None, "since": "earlier"}
        holder.acquire()
        with pytest.raises(ConfigError, match=rf"in use by process {other.pid} on .*delete .*\.lock"):
            Trainer(_cfg(tmp_path), source=MemorySource())
    finally:
        other.kill()
        other.wait()
    with caplog.at_level(logging.WARNING):
        _train(tmp_path, "train.steps=1")
    assert f"process {other.pid} on" in caplog.text and "which has exited" in caplog.text
    assert not (tmp_path / ".lock").exists()  # released at the end of the run


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "another-node", "slurm_job": "77", "since": "x"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ConfigError, match="in use by process 1 on another-node"):
        RunDirLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    RunDirLock(tmp_path).acquire()


@pytest.mark.parametrize("content", [b"", b'{"pid": 12, "ho', b"\0" * 64, b"[]"], ids=["empty", "torn", "nul", "list"])
def test_a_torn_lock_is_judged_by_its_age(tmp_path, caplog, content):
    lock = tmp_path / ".lock"
    lock.write_bytes(content)  # a start that crashed while writing it (or one writing it right now)
    with pytest.raises(ConfigError, match=r"\.lock is empty or unreadable and 0 s old.*start again in a minute") as err:
        RunDirLock(tmp_path).acquire()
    assert "None" not in str(err.value) and "\n" not in str(err.value)
    assert_same_bytes(lock.read_bytes(), content, ".lock")  # a refused start leaves it as it was
    os.utime(lock, (lock.stat().st_atime - 120, lock.stat().st_mtime - 120))
    taker = RunDirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        taker.acquire()
    assert f"taking over {lock}, left by a start that crashed" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taker.release()
    assert not lock.exists()


RACE = """
import json, os, sys, time
from pathlib import Path
from distgan.config import ConfigError
from distgan.rundir import RunDirLock

run_dir, me, other, delay = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
judge = RunDirLock._stale

def slow_judge(self, holder):  # both starters judge the same stale lock before either takes it
    reason = judge(self, holder)
    (run_dir / me).touch()
    deadline = time.time() + 5
    while not (run_dir / other).exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    return reason

RunDirLock._stale = slow_judge
lock = RunDirLock(run_dir)
try:
    lock.acquire()
except ConfigError as err:
    print("refused:", err)
    (run_dir / (me + ".decided")).touch()
    sys.exit(0)
(run_dir / (me + ".decided")).touch()
deadline = time.time() + 120
while not (run_dir / (other + ".decided")).exists() and time.time() < deadline:
    time.sleep(0.01)  # hold it until the other one has decided (not a fixed time: a loaded machine is slow)
print("held", json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid())
"""


def test_two_starters_taking_over_one_stale_lock_one_wins(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(), "slurm_job": None,
                                                "since": "earlier"}))  # a process that has exited
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), me, other, delay], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other, delay in (("a", "b", "0"), ("b", "a", "0.3"))]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert lines[0] == "held True" and lines[1].startswith("refused: "), outs


# ---------------------------------------------------------------- checkpoints: integrity and lineage


def _save(directory, step, value=0.0):
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    return save_checkpoint(directory, TrainState(step=step), {"G": model}, {}, keep=10)


def test_resume_auto_skips_a_corrupt_or_truncated_checkpoint_and_says_why(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _save(ckpts, step)
    (ckpts / "step-00000040.bak").mkdir()  # a user's copy: not ours, never discovered
    (ckpts / "step-00000040.bak" / "state.json").write_text("{}")
    weights = ckpts / "step-00000030" / "G.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last checkpoint
    weights.write_bytes(bytes(data))
    with open(ckpts / "step-00000020" / "optim.pt", "ab") as fh:
        fh.write(b"\0" * 512)  # NUL padding after a crash
    with caplog.at_level(logging.WARNING):
        assert find_resume_path("auto", tmp_path).name == "step-00000010"
    assert "step-00000030: G.safetensors does not match its SHA-256" in caplog.text
    assert "step-00000020: optim.pt has" in caplog.text
    with pytest.raises(ck.CheckpointError, match="damaged .*G.safetensors"):
        find_resume_path(str(ckpts / "step-00000030"), tmp_path)


def test_resaving_a_step_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    _save(tmp_path, 5, value=1.0)

    def failing_rename(src, dst):  # the new checkpoint's rename into place, after the old one was moved aside
        raise OSError("disk gone")

    monkeypatch.setattr("distgan.output.rename_noreplace", failing_rename)
    with pytest.raises(OSError):
        _save(tmp_path, 5, value=2.0)
    monkeypatch.undo()
    assert _steps_in(tmp_path) == ["step-00000005"] and sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005"]
    assert load_file(str(tmp_path / "step-00000005" / "G.safetensors"))["weight"][0, 0] == 1.0


def test_a_step_folder_holding_the_users_files_is_never_replaced(tmp_path):
    (tmp_path / "step-00000005").mkdir()
    (tmp_path / "step-00000005" / "notes.txt").write_text("mine")
    with pytest.raises(ck.CheckpointError, match="holds notes.txt, which is not a checkpoint's file; it was kept"):
        _save(tmp_path, 5)
    assert [p.name for p in (tmp_path / "step-00000005").iterdir()] == ["notes.txt"]


def _steps_in(directory):
    return [p.name for p in list_checkpoints(directory)]


def test_another_writers_temp_folder_is_left_alone(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".tmp-step-00000007-{other.pid}"
        theirs.mkdir(parents=True)
        dead = tmp_path / ".tmp-step-00000006-999999999"
        dead.mkdir()
        _save(tmp_path, 8)
        assert theirs.exists() and not dead.exists()
    finally:
        other.kill()
        other.wait()


def test_resuming_an_older_checkpoint_sets_the_newer_branch_aside(tmp_path):
    _train(tmp_path, "train.steps=20", "checkpoint.every=5", "checkpoint.keep=10")
    assert _steps(tmp_path)[-1] == "step-00000020"
    _train(tmp_path, "train.steps=12", "checkpoint.every=5", "checkpoint.keep=10",
           resume=str(tmp_path / "checkpoints" / "step-00000010"))
    (aside,) = (tmp_path / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir() if p.name.startswith("step-")) == ["step-00000015",
                                                                                     "step-00000020"]
    assert max(json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()) == 20
    assert _steps(tmp_path) == ["step-00000005", "step-00000010", "step-00000012"]
    assert find_resume_path("auto", tmp_path).name == "step-00000012"  # the new branch, not the stale step 20


# ---------------------------------------------------------------- config history and resume checks


def test_config_history_and_resume_changes(tmp_path, caplog):
    _train(tmp_path, "train.steps=2")
    with pytest.raises(ConfigError, match=r"loss.kind: non-saturating -> hinge; train.batch_size: 16 -> 32"):
        Trainer(_cfg(tmp_path, "train.steps=4", "train.batch_size=32", "loss.kind=hinge"), source=MemorySource(),
                resume="auto")
    _train(tmp_path / "b", "train.steps=2", "ema.enabled=false")
    with pytest.raises(ConfigError, match=r"ema.enabled: False -> True"):  # was "checkpoint incomplete"
        Trainer(_cfg(tmp_path / "b", "train.steps=4"), source=MemorySource(), resume="auto")
    with caplog.at_level(logging.INFO):
        _train(tmp_path, "train.steps=4", "g_optim.lr=0.0001", resume="auto")
    assert "resume changes g_optim.lr: 0.0002 -> 0.0001" in caplog.text
    history = sorted(p.name for p in (tmp_path / "configs").iterdir())
    assert history == ["0001-start-step-00000000.yaml", "0002-resume-step-00000002.yaml"]
    assert "lr: 0.0001" in (tmp_path / "config.yaml").read_text()
    assert "lr: 0.0002" in (tmp_path / "configs" / history[0]).read_text()


def test_a_key_added_since_the_run_started_counts_as_what_it_meant_then():
    """A run saved before generator.upsample existed resumes (the default is the old behaviour); one saved before
    generator.conditioning existed was conditioned by concatenation, so resuming it as norm is refused."""
    now = yaml.safe_dump(dataclasses.asdict(Config()))
    saved = yaml.safe_load(now)
    del saved["generator"]["upsample"], saved["generator"]["conditioning"]
    assert config_changes(yaml.safe_dump(saved), now) == ([], [])
    saved["generator"]["conditional"] = True
    current = yaml.safe_load(now)
    current["generator"]["conditional"] = True
    refused, _ = config_changes(yaml.safe_dump(saved), yaml.safe_dump(current))
    assert refused == ["generator.conditioning: concat -> norm"]
    current["generator"]["conditioning"] = "concat"
    assert config_changes(yaml.safe_dump(saved), yaml.safe_dump(current)) == ([], [])


def test_a_torn_metrics_tail_does_not_stop_a_resume(tmp_path):
    _train(tmp_path, "train.steps=2")
    with open(tmp_path / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 3, "loss_d": 0.6' + b"\0" * 300)  # a node crashed mid-line
    _train(tmp_path, "train.steps=3", resume="auto")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
