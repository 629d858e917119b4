"""log.tensorboard: losses and sample grids reach a TensorBoard event file (read back with TensorBoard's reader)."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distgan.config import load_config
from distgan.trainer import Trainer
from tests.distributed.support import MemorySource


@pytest.mark.timeout(120)
def test_losses_and_sample_grids_reach_tensorboard(tmp_path):
    cfg = load_config("smoke", [f"run.dir={tmp_path}", "train.steps=4", "log.every=2", "log.sample_every=2",
                                "log.wandb=false", "log.tensorboard=true", "log.gif=false"])
    Trainer(cfg, source=MemorySource()).fit()
    (folder,) = (tmp_path / "tensorboard").iterdir()
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss_d")] == [2, 4]
    assert [e.step for e in events.Scalars("images_per_s")] == [2, 4]
    for grid in ("samples/G_ema", "samples/G"):
        images = events.Images(grid)
        assert [i.step for i in images] == [2, 4] and (images[0].width, images[0].height) == (122, 122)
    assert not (tmp_path / "wandb").exists()
