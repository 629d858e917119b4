"""Monitoring plots of a run from its metrics.jsonl: losses, D(x) and D(G(z)), gradient norms, eval figures.

matplotlib's object API with the Agg canvas: no screen, no pyplot global state (safe inside training).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from distgan.tracking import read_metrics

log = logging.getLogger(__name__)

EVAL_PREFIX = "eval/"
REFERENCE_PREFIX = "eval_ref/"  # real-vs-real figures, drawn as a dashed line on the matching eval panel
PANELS = (  # file name, title, keys drawn together
    ("losses", "Losses", ("loss_d", "loss_g")),
    ("discriminator", "Mean D logit on real images D(x) and on generated D(G(z))", ("d_real", "d_fake")),
    ("gradients", "Gradient norms and penalty", ("grad_norm_d", "grad_norm_g", "penalty")),
)


def _number(value: Any) -> float | None:
    """Floats and ints; 'nan'/'inf' strings (how metrics.jsonl stores non-finite values) become floats."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have ``key`` as a number, by step; a step logged again after a
    resume keeps its last value."""
    by_step: dict[float, float] = {}
    for record in records:
        value = _number(record.get(key))
        if value is not None:
            by_step[float(record["step"])] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _save(figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def _line_plot(records: list[dict], keys: tuple[str, ...], title: str, path: Path) -> Path | None:
    from matplotlib.figure import Figure

    drawn = [(k, *series(records, k)) for k in keys]
    drawn = [(k, s, v) for k, s, v in drawn if s]
    if not drawn:
        return None
    figure = Figure(figsize=(8, 4.5))
    ax = figure.add_subplot()
    for key, steps, values in drawn:
        ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return _save(figure, path)


def eval_plot(records: list[dict], path: Path) -> Path | None:
    """One small panel per eval/<name> figure, with the eval_ref/<name> reference when logged."""
    from matplotlib.figure import Figure

    keys = sorted({k for r in records for k in r if k.startswith(EVAL_PREFIX) and _number(r[k]) is not None})
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    figure = Figure(figsize=(4 * cols, 3 * rows))
    for i, key in enumerate(keys):
        ax = figure.add_subplot(rows, cols, i + 1)
        name = key[len(EVAL_PREFIX):]
        steps, values = series(records, key)
        ax.plot(steps, values, marker="o", label="generated")
        _, reference = series(records, REFERENCE_PREFIX + name)
        if reference:
            ax.axhline(reference[-1], color="gray", linestyle="--", label="real vs real")
            ax.legend(fontsize="small")
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw ``run_dir/plots/*.png`` from ``run_dir/metrics.jsonl``; returns the files written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [_line_plot(records, keys, title, out / f"{name}.png") for name, title, keys in PANELS]
    written.append(eval_plot(records, out / "eval.png"))
    written = [p for p in written if p is not None]
    log.info("plots: %s", ", ".join(str(p) for p in written) or "nothing to plot")
    return written
