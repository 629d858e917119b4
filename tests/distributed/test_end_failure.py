"""An end-of-run failure on the main process (here the export) ends every rank at once, each with the error: the
other ranks skip the last evaluation too instead of waiting in its collectives for a rank that never comes (until
train.collective_timeout_s, 300 s here, against the 120 s this test allows)."""
from __future__ import annotations

import subprocess

import pytest

from tests.distributed.launching import cpu_env, kill_launched, launch_command, start

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(200)
def test_a_main_process_failure_at_the_end_ends_every_rank(tmp_path):
    cmd = launch_command(["tests/distributed/end_failure_run.py", str(tmp_path / "run")], processes=2)
    child = start(cmd, cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = child.communicate(timeout=120)
    finally:
        kill_launched(child)
    assert child.returncode != 0, out[-3000:]
    assert "rank 0 ended with: the export failed" in out, out[-3000:]
    assert "rank 1 ended with: the main process failed: the export failed" in out, out[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000002" / "state.json").is_file()
    # the last line names what was written: the checkpoint, not the export that failed
    assert f"trained 2 steps; checkpoint {run / 'checkpoints' / 'step-00000002'} written; the export failed: " in out
    assert not (run / "generator_ema.safetensors").exists()
