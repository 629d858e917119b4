"""What a command shows in the terminal: log lines, progress bars and its result lines, without one breaking another.

- Log lines go to stderr through ``tqdm.write``, so a progress bar is cleared before a line and redrawn after it
  instead of the line landing on the bar's own line.
- Third-party libraries speak at WARNING and above (their INFO lines are about their own business).
- Progress bars appear on the main process, on a terminal; ``DISTGAN_PROGRESS=1`` forces them (a log you follow
  with ``tail -f``), ``DISTGAN_PROGRESS=0`` turns them off.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Iterable, Iterator, Optional

from tqdm import tqdm

PROGRESS_ENV = "DISTGAN_PROGRESS"
# libraries whose INFO lines are noise in a training log (matplotlib's "generated new fontManager" and the like)
QUIET_LIBRARIES = ("accelerate", "wandb", "urllib3", "matplotlib", "PIL", "filelock", "fsspec", "torch", "h5py")


class TqdmHandler(logging.StreamHandler):
    """A logging handler that writes through ``tqdm.write`` (tqdm's own is private: tqdm.contrib.logging)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's contract: a failing handler reports and carries on
            self.handleError(record)


def main_process() -> bool:
    """This process is rank 0 of its launch (or the only one): the one that shows progress."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def show_progress() -> bool:
    """Progress bars on this process: DISTGAN_PROGRESS (1/0) when set, else on the main process on a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return main_process()
    if forced in ("0", "false", "no", "off"):
        return False
    return main_process() and sys.stderr.isatty()


def setup_logging(rank: Optional[str] = None) -> None:
    """INFO lines of distgan on stderr (through tqdm), the process's rank in each when ``rank`` is given;
    third-party libraries at WARNING."""
    prefix = f"[rank {rank}] " if rank is not None else ""
    handler = TqdmHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])  # a no-op where logging is set up already
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: Optional[str] = None,
             unit: str = "it", show: bool = True, leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (over ``iterable``, or updated by hand), shown only where ``show_progress()`` allows
    (and ``show``); gone when done unless ``leave``."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not (show and show_progress()),
                dynamic_ncols=True, leave=leave, mininterval=0.5, **kwargs)


def batches(total: int, batch: int, desc: str, unit: str = "img", show: bool = True) -> Iterator[int]:
    """``range(0, total, batch)`` with a bar counted in items (the last batch may be short)."""
    with progress(total=total, desc=desc, unit=unit, show=show) as bar:
        for start in range(0, total, batch):
            yield start
            bar.update(min(batch, total - start))


def say(line: str) -> None:
    """A command's result line on stdout (where a run's files are, how it ended), clear of any bar."""
    tqdm.write(line, file=sys.stdout)
