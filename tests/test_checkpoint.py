import json
import os
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
