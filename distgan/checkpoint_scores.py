"""Every checkpoint of a run scored once: ``python -m distgan.eval --run RUN --all-checkpoints``.

Each intact checkpoint's generator (G_ema, or G when EMA was off; ``checkpoints/best/`` too, labelled) is scored
by one Evaluator, so the real statistics and the feature network are built once for all of them, and every
checkpoint sees the same latents. Scores are kept in ``RUN/eval/checkpoints.jsonl``, one record per generator
file and evaluation settings: the file is named by its SHA-256 from the checkpoint's manifest (a best/ copy of a
checkpoint is the same file, scored once), the settings by a hash of what changes the figures (metrics, n, seed,
feature network, real data). A second call scores only new checkpoints; records of checkpoints that
``checkpoint.keep`` has since removed stay on the curve. ``RUN/eval/checkpoints.md`` is the table with the best
marked, ``RUN/eval/checkpoints.png`` a panel per figure over the steps (stylegan2-ada's per-snapshot metric
jsonl, StudioGAN's best-checkpoint table).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from distgan.checkpoint import checkpoint_step, list_checkpoints, verify_checkpoint
from distgan.config import DataConfig, EvalConfig
from distgan.errors import UserError
from distgan.export import load_generator_export, read_export_metadata
from distgan.metrics.cache import dataset_key
from distgan.metrics.evaluator import Evaluator
from distgan.metrics.feature_net import file_digest
from distgan.metrics.generator_eval import generator_evaluator
from distgan.metrics.registry import METRICS, is_better, metric_of

log = logging.getLogger(__name__)

RESULTS_DIR = "eval"  # in the run dir
RESULTS_FILE = "checkpoints.jsonl"
TABLE_FILE = "checkpoints.md"
PLOT_FILE = "checkpoints.png"


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint folder found in the run: its generator file and that file's SHA-256, or why it is skipped."""

    folder: Path
    step: int
    name: str  # as the table shows it: step-00000020, best/step-00000020
    generator: Optional[Path] = None
    sha256: Optional[str] = None
    problem: Optional[str] = None


def find_checkpoints(run: Path) -> list[Checkpoint]:
    """The run's checkpoints (oldest first), then the best/ one; each verified against its manifest."""
    root = run / "checkpoints"
    found = [(c, c.name) for c in list_checkpoints(root)]
    found += [(c, f"best/{c.name}") for c in list_checkpoints(root / "best")]
    out = []
    for folder, name in found:
        checkpoint = Checkpoint(folder, checkpoint_step(folder), name, problem=verify_checkpoint(folder))
        if checkpoint.problem is None:
            files = [folder / f"{g}.safetensors" for g in ("G_ema", "G") if (folder / f"{g}.safetensors").is_file()]
            if not files:
                checkpoint.problem = "it holds no generator (G_ema.safetensors or G.safetensors)"
            else:
                checkpoint.generator = files[0]
                manifest = json.loads((folder / "state.json").read_text()).get("manifest", {})
                entry = manifest.get(files[0].name)  # verified above; a version-1 checkpoint has no manifest
                checkpoint.sha256 = entry["sha256"] if entry else file_digest(files[0])
        out.append(checkpoint)
    return out


def settings_of(evaluator: Evaluator, data_cfg: DataConfig, seed: int) -> dict:
    """What the figures depend on besides the generator: a change gives new records, never stale ones."""
    cfg, net = evaluator.cfg, evaluator.net
    return {"metrics": sorted(cfg.metrics), "n": cfg.n, "seed": seed, "features": f"{net.kind}:{net.digest}",
            "data": dataset_key(data_cfg.path) or data_cfg.path,
            "test_data": (dataset_key(evaluator.test_path) or evaluator.test_path) if evaluator.test_path else None,
            "reference_stats": file_digest(Path(cfg.reference_stats)) if cfg.reference_stats else None,
            "prdc_k": cfg.prdc_k}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_results(path: Path) -> list[dict]:
    """The records of RUN/eval/checkpoints.jsonl; a torn or foreign line is skipped (it is scored again)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and {"generator_sha256", "settings_key", "step", "figures"} <= record.keys():
            records.append(record)
        elif line.strip():
            log.warning("%s line %d is not a checkpoint score; skipped", path, number)
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def score_checkpoints(run: Path, data_cfg: DataConfig, eval_cfg: EvalConfig, seed: int,
                      device: torch.device) -> dict:
    """Score every intact checkpoint of ``run`` not scored with these settings yet; write the table and the plot;
    return the summary (every checkpoint's figures, the best, the real-vs-real reference, what was skipped)."""
    start = time.perf_counter()
    found = find_checkpoints(run)
    for bad in (c for c in found if c.problem):
        log.warning("skipping checkpoint %s: %s", bad.folder, bad.problem)
    intact = [c for c in found if c.problem is None]
    if not intact:
        damaged = "; ".join(f"{c.name}: {c.problem}" for c in found)
        raise UserError(f"{run}: no intact checkpoint to score" + (f" ({damaged})" if damaged else
                        " (no checkpoints/step-* folder: not a run dir of distgan.train, or it stopped before its "
                        "first checkpoint)"))
    newest = intact[-1].generator
    evaluator, trained = generator_evaluator(read_export_metadata(newest), newest, data_cfg, eval_cfg, seed, device)
    settings = settings_of(evaluator, data_cfg, seed)
    key = settings_key(settings)
    out_dir = run / RESULTS_DIR
    out_dir.mkdir(exist_ok=True)
    results = out_dir / RESULTS_FILE
    known = {r["generator_sha256"]: r for r in read_results(results) if r["settings_key"] == key}
    scored = 0
    for checkpoint in intact:
        if checkpoint.sha256 in known:
            continue
        model, _ = load_generator_export(checkpoint.generator, device)
        figures = evaluator.evaluate(model, rank=0, world_size=1, gather=lambda t: t)
        record = {"step": checkpoint.step, "checkpoint": str(checkpoint.generator.relative_to(run)),
                  "generator_sha256": checkpoint.sha256, "settings_key": key, "figures": figures,
                  "reference": evaluator.reference(), "settings": settings,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _append(results, record)
        known[checkpoint.sha256] = record
        scored += 1
    rows = _rows(intact, known)
    reference = next((r["reference"] for r in reversed(list(known.values())) if r.get("reference")), {})
    best = _best(rows, eval_cfg.best_metric)
    summary = {"checkpoints": [{"step": r["step"], "checkpoints": r["names"], **r["figures"]} for r in rows],
               "best": best, "reference": reference,
               "skipped": [{"checkpoint": str(c.folder), "problem": c.problem} for c in found if c.problem],
               "scored": scored, "cached": len({c.sha256 for c in intact}) - scored,
               "results": str(results), "table": str(out_dir / TABLE_FILE), "plot": None,
               "meta": {"n": evaluator.cfg.n, "seed": seed, "metrics": evaluator.cfg.metrics,
                        "features": evaluator.net.kind, "data": data_cfg.path, "test_data": evaluator.test_path,
                        "settings_key": key, "seconds": round(time.perf_counter() - start, 2)}}
    if trained is not None:
        summary["meta"]["feature_classifier_trained"] = trained
    write_table(out_dir / TABLE_FILE, run, rows, reference, best, summary)
    plot = plot_scores(out_dir / PLOT_FILE, rows, reference)
    summary["plot"] = str(plot) if plot else None
    return summary


def _rows(intact: list[Checkpoint], known: dict[str, dict]) -> list[dict]:
    """One row per generator file (a checkpoint and its best/ copy share one), by step; then the records of
    checkpoints removed since they were scored (keep-last-K), older than every checkpoint kept."""
    rows: dict[str, dict] = {}
    for checkpoint in intact:
        row = rows.setdefault(checkpoint.sha256, {"step": checkpoint.step, "names": [], "present": True,
                                                  "figures": known[checkpoint.sha256]["figures"]})
        row["names"].append(checkpoint.name)
    oldest = min(c.step for c in intact)
    removed = {r["step"]: r for r in known.values() if r["generator_sha256"] not in rows and r["step"] < oldest}
    for step, record in removed.items():
        rows[record["generator_sha256"]] = {"step": step, "names": [], "present": False, "figures": record["figures"]}
    return sorted(rows.values(), key=lambda r: (r["step"], not r["present"]))


def _best(rows: list[dict], best_metric: Optional[str]) -> Optional[dict]:
    """The kept checkpoint with the best value of eval.best_metric (else fd), finite values only; None when no
    row has that figure."""
    figure = best_metric or "fd"
    best = None
    for row in rows:
        value = row["figures"].get(figure)
        if not row["present"] or value is None or not math.isfinite(value):
            continue
        if best is None or is_better(figure, value, best["value"]):
            best = {"step": row["step"], "checkpoints": row["names"], "metric": figure, "value": value}
    return best


def _cell(template: str, figures: dict) -> str:
    try:
        return template.format(**figures)
    except (KeyError, ValueError):
        return "n/a"


def write_table(path: Path, run: Path, rows: list[dict], reference: dict, best: Optional[dict], summary: dict) -> None:
    """RUN/eval/checkpoints.md: a row per checkpoint (the best in bold), the real-vs-real floor, what was skipped."""
    shown = {f for r in rows for f in r["figures"]}
    columns = [c for m in METRICS.values() if set(m.figures) & shown for c in m.columns]
    meta = summary["meta"]
    lines = [f"# Checkpoints of {run.name}", "",
             f"{meta['n']} generated images per checkpoint (seed {meta['seed']}), {meta['features']} features, real "
             f"data {meta['data']}" + (f", test split {meta['test_data']}" if meta["test_data"] else "") + "."]
    if best is not None:
        direction = "higher" if best["metric"] in metric_of(best["metric"]).higher_is_better else "lower"
        lines.append(f"Best by {best['metric']} ({direction} is better): step {best['step']} "
                     f"({', '.join(best['checkpoints'])}), {best['metric']} {best['value']:.4g}.")
    lines += ["", "| step | checkpoint | " + " | ".join(h for h, _ in columns) + " |",
              "|---:|---|" + "---:|" * len(columns)]
    for row in rows:
        is_best = best is not None and row["present"] and row["names"] == best["checkpoints"]
        step = f"**{row['step']}** (best)" if is_best else str(row["step"])
        names = ", ".join(row["names"]) if row["present"] else "(removed since scored)"
        lines.append(f"| {step} | {names} | " + " | ".join(_cell(t, row["figures"]) for _, t in columns) + " |")
    if reference:
        lines.append("| real vs real | test split | " + " | ".join(_cell(t, reference) for _, t in columns) + " |")
    if summary["skipped"]:
        lines += ["", "Skipped (damaged): " + "; ".join(f"{Path(s['checkpoint']).name}: {s['problem']}"
                                                        for s in summary["skipped"]) + "."]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def plot_scores(path: Path, rows: list[dict], reference: dict) -> Optional[Path]:
    """A panel per ranked figure over the steps, the real-vs-real floor dashed (distgan.plots' eval panels)."""
    from distgan.plots import eval_plot  # matplotlib loads only here

    def ranked(figures: dict) -> dict:
        return {f"eval/{k}": v for k, v in figures.items() if k in metric_of(k).ranked}

    records = [{"step": r["step"], **ranked(r["figures"])} for r in rows]
    if reference and rows:
        records.append({"step": rows[-1]["step"], **{k.replace("eval/", "eval_ref/"): v
                                                      for k, v in ranked(reference).items()}})
    return eval_plot(records, path)
