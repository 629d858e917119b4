"""What a run shows: metrics.jsonl, the progress bar, sample grids, progress.gif, and wandb (via Accelerate).

Everything here runs on the main process only; other ranks never call into it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from distgan.console import progress

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"  # the run dir's wandb run id: made at its first start, reused on every resume
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_WANDB_FOLDER = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]{1,64})")  # wandb/offline-run-TIME-ID


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one uint8 grid image [H', W', C] (C = 1 or 3), nrow images per row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if rows * nrow > n:  # blank cells to fill the last row
        x = torch.cat([x, torch.zeros(rows * nrow - n, c, h, w, dtype=torch.uint8)])
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0))
    grid = rearrange(x, "(r k) c h w -> (r h) (k w) c", r=rows, k=nrow)
    grid = torch.nn.functional.pad(grid, (0, 0, 0, pad, 0, pad))
    return grid.numpy()


def save_grid(images: torch.Tensor, path: Path, nrow: Optional[int] = None) -> Path:
    grid = image_grid(images, nrow)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_gif(frames: list[Path], path: Path, duration_ms: int = 200) -> Optional[Path]:
    """A GIF of the sample grids in order; the last frame is held longer."""
    if not frames:
        return None
    images = [Image.open(f).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    durations = [duration_ms] * (len(images) - 1) + [duration_ms * 5]
    tmp = path.with_suffix(".gif.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    os.replace(tmp, path)
    return path


def sample_grids(run_dir: Path) -> list[Path]:
    """The sample grids in step order: G_ema's, or G's when there is no EMA."""
    samples = run_dir / "samples"
    return sorted(samples.glob("g_ema-step-*.png")) or sorted(samples.glob("g-step-*.png"))


def final_figures(figures: dict[str, float], classes: Optional[list[str]]) -> str:
    """The end-of-run evaluation in a few words: fd, modes covered (of the classes) and class agreement when
    evaluated."""
    parts = [f"fd {figures['fd']:.4g}"] if "fd" in figures else []
    if "modes_covered" in figures:
        parts.append(f"modes covered {figures['modes_covered']:.0f}" + (f" of {len(classes)}" if classes else ""))
    if "class_agreement" in figures:
        parts.append(f"class agreement {figures['class_agreement']:.3f}")
    return ", ".join(parts) or ", ".join(f"{k} {v:.4g}" for k, v in figures.items())


def end_lines(run_dir: Path, step: int, final: Optional[dict[str, float]], classes: Optional[list[str]],
              scorable: bool) -> list[str]:
    """What to look at after a run: the last grid, the GIF and the plots, then the evaluation at the last ``step``
    (``final``), or, when a feature classifier is there for it (``scorable``), the command that scores the run."""
    grids = sample_grids(run_dir)
    places = (("last samples", grids[-1] if grids else None), ("progress", run_dir / "progress.gif"),
              ("plots", run_dir / "plots"))
    shown = [f"{name} {path}" for name, path in places if path is not None and path.exists()]
    lines = ["see: " + "; ".join(shown)] if shown else []
    if final is not None:
        lines.append(f"evaluation at step {step}: " + final_figures(final, classes))
    elif scorable:
        lines.append(f"score it: python -m distgan.eval --run {run_dir}")
    return lines


def tracker_config(cfg: Any) -> dict[str, Any]:
    """The config as flat ``section.key`` scalars: what wandb shows and TensorBoard's hparams accept (lists become
    strings, None the string 'None')."""
    flat = {}
    for section, values in dataclasses.asdict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def wandb_mode_for_environment() -> str:
    """WANDB_MODE if set; else offline when no credentials exist (never block on a network login)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path(os.path.expanduser("~/.netrc")).is_file()
    return "online" if has_key else "offline"


WANDB_INIT_TIMEOUT_S = 30.0  # how long an online run waits for wandb's server before it logs offline instead


def init_trackers(accelerator: Any, project: str, config: dict, wandb_kwargs: dict) -> None:
    """Accelerate's trackers. wandb online waits at most WANDB_INIT_TIMEOUT_S for its server, then runs offline
    with a warning (``wandb sync`` uploads later) instead of stalling or failing the run; a missing or bad API key
    stays an error the user fixes (distgan.cli says how)."""
    online = "wandb" in [str(t) for t in accelerator.log_with] and os.environ.get("WANDB_MODE") == "online"
    kwargs = dict(wandb_kwargs)
    if online:
        import wandb  # lazy: about a second at import

        kwargs.setdefault("settings", wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S))
    try:
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": kwargs})
    except Exception as err:
        if not online or not isinstance(err, wandb.errors.CommError):
            raise
        log.warning("wandb: no answer from its server within %.0f s (%s); logging offline instead: upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", WANDB_INIT_TIMEOUT_S, " ".join(str(err).split())[:160],
                    kwargs.get("dir", "."))
        wandb.teardown()  # the failed online run still holds its id in wandb's service
        accelerator.trackers = []
        os.environ["WANDB_MODE"] = "offline"
        kwargs.pop("settings")
        accelerator.init_trackers(project, config=config, init_kwargs={"wandb": kwargs})


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run dir: read from ``wandb_id``, or made and written there at its first start.

    Unique to the run dir (two run dirs named alike are two wandb runs), the same on resume (the wandb run goes on).
    A run dir from before the file existed goes on with the newest wandb run in its ``wandb/`` folder.
    """
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        kept = path.read_text(errors="replace").strip()
        if _WANDB_ID.fullmatch(kept):
            return kept
        log.warning("%s holds no wandb run id (%r); this run continues as a new wandb run", path, kept[:80])
    earlier = sorted(m.groups() for p in (run_dir / "wandb").glob("*run-*") if (m := _WANDB_FOLDER.fullmatch(p.name)))
    run_id = earlier[-1][1] if earlier else uuid.uuid4().hex[:16]
    tmp = path.with_name(WANDB_ID_FILE + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def wandb_init_kwargs(log_cfg: Any, run_name: str, run_dir: Path) -> dict[str, Any]:
    """What ``wandb.init`` gets (through init_trackers): the run dir's id, name, entity, group, tags,
    notes; resumed when the id exists."""
    return {"dir": str(run_dir), "name": run_name, "id": wandb_run_id(run_dir), "resume": "allow",
            "entity": log_cfg.wandb_entity, "group": log_cfg.wandb_group, "tags": list(log_cfg.wandb_tags),
            "notes": log_cfg.wandb_notes}


class RunLog:
    """metrics.jsonl lines, the wandb tracker (when the accelerator has one), and a progress bar (where one is shown:
    distgan.console) or else a text line per record of the training figures."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, accelerator: Any, progress_bar: bool):
        self.run_dir = run_dir
        self.accelerator = accelerator
        self.total_steps = total_steps
        self.metrics_file = _open_metrics(run_dir / "metrics.jsonl", start_step)
        self.bar = progress(total=total_steps, initial=start_step, unit="step", show=progress_bar, leave=True)
        self.last_time = time.perf_counter()
        self.last_images = None

    def images_per_second(self, images_seen: int) -> float:
        now = time.perf_counter()
        rate = 0.0
        if self.last_images is not None and now > self.last_time:
            rate = (images_seen - self.last_images) / (now - self.last_time)
        self.last_time, self.last_images = now, images_seen
        return rate

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        shown = {k: f"{v:.3g}" for k, v in record.items()
                 if k in ("loss_d", "loss_g", "images_per_s") and isinstance(v, float)}
        if shown and self.bar.disable:  # no bar: a line per record, so a log file shows progress
            log.info("step %d/%d: %s", step, self.total_steps,
                     ", ".join(f"{v} images/s" if k == "images_per_s" else f"{k} {v}" for k, v in shown.items()))
        elif shown:
            self.bar.set_postfix(shown, refresh=False)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """The sample grids (PNG files) to every tracker that takes images (wandb, TensorBoard)."""
        names = {tracker.name for tracker in self.accelerator.trackers}
        if "wandb" in names:
            import wandb  # lazy: about a second at import

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)
        if "tensorboard" in names:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            for key, path in images.items():
                with Image.open(path) as image:
                    writer.add_image(key, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
            writer.flush()

    def close(self) -> None:
        self.bar.close()
        self.metrics_file.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not a JSON record (a torn or NUL-padded tail after a
    crash) is skipped with a warning."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is a run's metrics.jsonl (is this a run dir?)")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            log.warning("%s line %d is not a metrics record (torn by a crash?); skipped", path, number)
    return records


def _open_metrics(path: Path, start_step: int):
    """Append from ``start_step``: lines logged after the checkpoint a run resumes from are dropped."""
    kept = []
    if start_step > 0 and path.is_file():
        kept = [json.dumps(r) for r in read_metrics(path) if r["step"] <= start_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return open(path, "a", buffering=1)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
