import json
import logging
import os
import re
import signal

import pytest
import torch

from distgan import checkpoint as ck
from distgan.checkpoint import TrainState, find_resume_path, list_checkpoints, load_checkpoint, save_checkpoint
from distgan.stop import StopRequest


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_save_load_round_trip_and_keep_last_k(tmp_path):
    m = _model()
    m[1].running_mean.fill_(0.5)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, TrainState(step=step, images_seen=step * 4), {"G": m}, {"g": opt.state_dict()}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    other = _model(seed=1)
    opt2 = torch.optim.Adam(other.parameters())
    state, optim = load_checkpoint(tmp_path / "step-00000030", {"G": other})
    opt2.load_state_dict(optim["g"])
    assert state.step == 30 and state.images_seen == 120
    for a, b in zip(m.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path, monkeypatch):
    m = _model()
    save_checkpoint(tmp_path, TrainState(step=1), {"G": m}, {}, keep=3)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, TrainState(step=2), {"G": m}, {}, keep=3)
    # the crashed write left only a temp folder; the latest complete checkpoint is still step 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not (tmp_path / "step-00000002").exists()
    monkeypatch.undo()
    save_checkpoint(tmp_path, TrainState(step=3), {"G": m}, {}, keep=3)
    assert not list(tmp_path.glob(".tmp-*"))


def test_find_resume_path(tmp_path):
    run = tmp_path / "run"
    assert find_resume_path(None, run) is None
    assert find_resume_path("auto", run) is None  # a fresh start
    save_checkpoint(run / "checkpoints", TrainState(step=5), {"G": _model()}, {}, keep=3)
    save_checkpoint(run / "checkpoints", TrainState(step=9), {"G": _model()}, {}, keep=3)
    assert find_resume_path("auto", run).name == "step-00000009"
    assert find_resume_path(str(run / "checkpoints" / "step-00000005"), run).name == "step-00000005"
    with pytest.raises(ck.CheckpointError, match="no checkpoint there.*--resume auto"):
        find_resume_path(str(run / "nothing"), run)


def _damage(meta):
    meta["manifest"]["G.safetensors"] = ["not", "a", "dict"]


@pytest.mark.parametrize("damage, why", [
    (_damage, r"manifest entry for 'G.safetensors' is not"),
    (lambda meta: meta["manifest"].update({"../../x": {"bytes": 1, "sha256": "0"}}), r"manifest names '\.\./\.\./x'"),
    (lambda meta: meta.update(manifest=[1, 2]), "no manifest"),
    (lambda meta: meta.update(epoch=3), "counters are damaged \\(unknown key 'epoch'\\)"),
    (lambda meta: meta.pop("step"), "counters are damaged \\(step missing\\)"),
    (lambda meta: meta.update(images_seen="12"), "images_seen is '12', not a count"),
    (lambda meta: meta.update(batches_consumed=-1), "batches_consumed is -1, not a count"),
    (lambda meta: meta.update(skipped_steps=[0] * 100), r"skipped_steps is \[0, 0, 0.*\.\.\., not a count"),
    (lambda meta: meta.update(world_size=0), "world_size is 0"),
    (lambda meta: meta.update(world_size=True), "world_size is True, not a count"),
], ids=["entry-not-dict", "entry-path", "manifest-list", "unknown-key", "missing-step", "str-count", "negative",
        "long-list", "world-0", "bool"])
def test_a_malformed_state_json_is_a_damaged_checkpoint(tmp_path, caplog, damage, why):
    for step in (1, 2):
        save_checkpoint(tmp_path / "checkpoints", TrainState(step=step), {"G": _model()}, {}, keep=3)
    newest = tmp_path / "checkpoints" / "step-00000002"
    meta = json.loads((newest / "state.json").read_text())
    damage(meta)
    (newest / "state.json").write_text(json.dumps(meta))
    assert re.search(why, ck.verify_checkpoint(newest))
    with caplog.at_level(logging.WARNING):
        assert find_resume_path("auto", tmp_path).name == "step-00000001"
    assert re.search(f"skipping checkpoint {newest}: .*{why}", caplog.text)
    with pytest.raises(ck.CheckpointError, match=f"--resume {newest}: the checkpoint is damaged .*{why}"):
        find_resume_path(str(newest), tmp_path)
    with pytest.raises(ck.CheckpointError, match=f"{newest}: the checkpoint is damaged .*{why}"):
        load_checkpoint(newest, {"G": _model()})


def test_a_version_1_checkpoint_without_later_counters_still_loads(tmp_path):
    save_checkpoint(tmp_path, TrainState(step=4, images_seen=8), {"G": _model()}, {}, keep=1)
    path = tmp_path / "step-00000004"
    meta = json.loads((path / "state.json").read_text())
    for key in ("manifest", "skipped_steps", "overflow_steps"):
        del meta[key]
    (path / "state.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert ck.verify_checkpoint(path) is None
    state, _ = load_checkpoint(path, {"G": _model()})
    assert state == TrainState(step=4, images_seen=8)


def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                    real_fsync(fd))[1])
    import distgan.output

    real_rename = distgan.output.rename_noreplace  # the rename into place (distgan.output)
    monkeypatch.setattr(distgan.output, "rename_noreplace",
                        lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(ck.os, "replace", lambda a, b: events.append(("replace", str(a), str(b))))
    final = save_checkpoint(tmp_path, TrainState(step=3), {"G": _model()}, {"g": {}}, keep=2, config_yaml="a: 1\n")
    monkeypatch.undo()
    (rename,) = [e for e in events if e[0] in ("rename", "replace")]
    assert rename[0] == "rename" and rename[2] == str(final)
    tmp, at = rename[1], events.index(rename)
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    expected = {os.path.join(tmp, f.name) for f in final.iterdir()} | {tmp}
    assert expected <= synced_before, expected - synced_before
    assert {f.name for f in final.iterdir()} == {"G.safetensors", "optim.pt", "config.yaml", "state.json"}
    assert ("fsync", str(tmp_path)) in events[at + 1:]  # the rename itself made durable


def test_mismatched_model_names_the_file_and_the_fix(tmp_path):
    save_checkpoint(tmp_path, TrainState(step=1), {"G": _model()}, {}, keep=1)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"G.safetensors does not fit.*config.yaml"):
        load_checkpoint(tmp_path / "step-00000001", {"G": other})


def test_optimizer_state_loads_without_unpickling(tmp_path):
    save_checkpoint(tmp_path, TrainState(step=1), {"G": _model()}, {"g": {"x": torch.ones(2)}}, keep=1)
    loaded = torch.load(tmp_path / "step-00000001" / "optim.pt", weights_only=True)
    assert torch.equal(loaded["g"]["x"], torch.ones(2))
    meta = json.loads((tmp_path / "step-00000001" / "state.json").read_text())
    assert meta["format_version"] == ck.FORMAT_VERSION and meta["step"] == 1


def test_stop_request_by_signal_and_by_file(tmp_path):
    stop = StopRequest(tmp_path)
    try:
        assert not stop.local()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.local() and "SIGUSR1" in stop.reason()
        stop.signalled = None
        (tmp_path / "STOP").touch()
        assert stop.local() and "STOP" in stop.reason()
        stop.clear()
        assert not stop.local()
    finally:
        stop.restore()


@pytest.mark.parametrize("text", [
    '{"metric": "fd", "value": 3.5, "step": "ten"}',   # a step that is not a number
    '{"metric": "fd", "value": "low", "step": 10}',    # a value that is not a number
    '{"metric": 1, "value": 3.5, "step": 10}',         # a metric that is not a name
    '{"metric": "fd", "value": 3.5, "step": 10.5}',
    '{"metric": "fd", "value": 3.5}', '[1, 2]', '{"metric": "fd", "val', ''])
def test_a_malformed_best_json_is_no_best_not_a_crash(tmp_path, caplog, text):
    best = tmp_path / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "best.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        assert ck.read_best(tmp_path) is None and ck.read_best_step(best) is None
        assert ck.set_aside_newer(tmp_path / "checkpoints", 5) is None  # a resume to step 5 goes on
    assert "best.json" in caplog.text


def test_a_good_best_json_is_read(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "best.json").write_text('{"metric": "fd", "value": 3.5, "step": 10, "checkpoint": "step-00000010"}')
    assert ck.read_best(tmp_path)["value"] == 3.5 and ck.read_best_step(best) == 10
