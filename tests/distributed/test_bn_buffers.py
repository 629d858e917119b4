"""Plain batch norm in G under DDP: each rank's running statistics come from its own samples (buffers are not
broadcast), so G_ema, evaluation and checkpoints would hold rank-specific models. They are averaged over the
ranks at every sync point: after training, G's and G_ema's buffers are identical on both ranks."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launching import launch

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(300)
def test_plain_bn_buffers_identical_across_ranks(tmp_path):
    launch(["tests/distributed/equivalence_run.py", str(tmp_path), "none.bn-g", "--steps", "6"], processes=2,
           timeout=240)
    r0, r1 = (load_file(str(tmp_path / "none.bn-g" / f"world2-rank{r}.safetensors")) for r in (0, 1))
    stats = [k for k in r0 if "running_" in k and k.split(".")[0] in ("G", "G_ema")]
    assert len(stats) >= 4 and any(k.startswith("G_ema.") for k in stats)
    for key in stats:
        assert torch.equal(r0[key], r1[key]), f"{key} differs across ranks"
    assert not torch.equal(r0[stats[0]], torch.zeros_like(r0[stats[0]]))  # statistics were really updated
