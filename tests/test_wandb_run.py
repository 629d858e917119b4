"""The wandb run of a run dir: its own id (two run dirs named alike are two runs), the same id on resume, and the
entity, group, tags and notes of the config, read back from what wandb wrote offline."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from wandb.proto import wandb_internal_pb2

from conftest import run_cli
from distgan.config import ConfigError
from distgan.rundir import existing_results, refuse_overwrite, set_aside_results
from distgan.tracking import WANDB_ID_FILE, wandb_run_id

TINY = ("train.steps=2", "log.every=1", "log.sample_every=2", "checkpoint.every=2", "log.gif=false", "log.wandb=true")
WANDB_KEYS = ("log.wandb_entity=lab", "log.wandb_group=seeds", "log.wandb_tags=[baseline, r1]",
              "log.wandb_notes=a tiny run")


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of an offline run's ``run-ID.wandb``: a ':W&B' header (7 bytes), then LevelDB-log framing
    (32 KiB blocks; each chunk: crc32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last))."""
    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a wandb data file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def run_records(run: Path) -> list[wandb_internal_pb2.RunRecord]:
    """The run record of every offline wandb run in the run dir, oldest first."""
    found = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        (data,) = folder.glob("run-*.wandb")
        found.append(next(r.run for r in wandb_records(data) if r.WhichOneof("record_type") == "run"))
    return found


def train(shards: Path, run: Path, *extra: str) -> None:
    run_cli("distgan.train", "--config", "smoke", f"data.path={shards}", f"run.dir={run}", *TINY, *extra)


@pytest.mark.timeout(240)
def test_run_dirs_named_alike_are_two_wandb_runs_and_a_resume_continues_its_own(fashion_shards, tmp_path):
    first, second = tmp_path / "x" / "exp", tmp_path / "y" / "exp"
    train(fashion_shards, first, *WANDB_KEYS)
    train(fashion_shards, second)
    (a,), (b,) = run_records(first), run_records(second)
    assert a.run_id != b.run_id
    assert [a.run_id, b.run_id] == [(run / WANDB_ID_FILE).read_text().strip() for run in (first, second)]
    assert a.display_name == b.display_name == "exp"
    assert (a.entity, a.run_group, list(a.tags), a.notes) == ("lab", "seeds", ["baseline", "r1"], "a tiny run")
    assert (b.run_group, list(b.tags), b.notes) == ("", [], "")

    train(fashion_shards, first, "--resume", "auto", "train.steps=4", *WANDB_KEYS)
    before, after = run_records(first)
    assert after.run_id == before.run_id == a.run_id, "a resumed run logs to the same wandb run"


def test_the_id_is_made_once_per_run_dir_and_kept(tmp_path, caplog):
    one, other = tmp_path / "a" / "exp", tmp_path / "b" / "exp"
    one.mkdir(parents=True)
    other.mkdir(parents=True)
    made = wandb_run_id(one)
    assert wandb_run_id(one) == made and wandb_run_id(other) != made
    (one / WANDB_ID_FILE).write_bytes(b"\x00\x00torn")
    renewed = wandb_run_id(one)
    assert renewed != made and (one / WANDB_ID_FILE).read_text().strip() == renewed
    assert "holds no wandb run id" in caplog.text


def test_a_run_dir_from_before_the_id_file_goes_on_with_its_newest_wandb_run(tmp_path):
    for name in ("offline-run-20250101_120000-exp-0", "offline-run-20250102_080000-exp-0", "debug.log"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    (tmp_path / "wandb" / "run-20241231_000000-older").mkdir()
    assert wandb_run_id(tmp_path) == "exp-0" == (tmp_path / WANDB_ID_FILE).read_text().strip()


def test_the_id_file_is_one_of_the_run_dir_results(tmp_path):
    """A fresh start does not take over a run's wandb run; a restart without a checkpoint sets it aside with the rest
    (the new branch gets a new wandb run)."""
    wandb_run_id(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert existing_results(tmp_path) == ["metrics.jsonl", WANDB_ID_FILE]
    with pytest.raises(ConfigError, match=WANDB_ID_FILE):
        refuse_overwrite(tmp_path)
    aside = set_aside_results(tmp_path)
    assert (aside / WANDB_ID_FILE).is_file() and not (tmp_path / WANDB_ID_FILE).exists()
