"""A trained generator evaluated outside training: the Evaluator its metadata calls for, its figures with the
real-vs-real reference and a ``meta`` record (what ``python -m distgan.eval`` prints), and the real statistics
file of ``python -m distgan.eval stats``.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from distgan.config import ConfigError, DataConfig, EvalConfig
from distgan.data.shards import read_dataset_info
from distgan.metrics.evaluator import Evaluator
from distgan.metrics.feature_net import ensure_feature_net
from distgan.metrics.frechet import save_reference_stats
from distgan.metrics.registry import names
from distgan.output import Output, OutputError


def _reference_stats_only(path: Path) -> None:
    """An existing --out is replaced only when it is reference statistics (an .npz with mu and sigma)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            ours = {"mu", "sigma"} <= set(data.files)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise OutputError(f"--out {path} exists and is not reference statistics (an .npz with mu and sigma); it was "
                          "kept: move it away or choose another --out")


def write_reference_stats(data_cfg: DataConfig, eval_cfg: EvalConfig, out: Path, device: torch.device) -> dict:
    """``python -m distgan.eval stats``: mu and sigma of eval.n real train images' features, pytorch-fid's layout."""
    info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
    ensure_feature_net(eval_cfg, data_cfg.path, info)
    evaluator = Evaluator(dataclasses.replace(eval_cfg, metrics=["fd"], reference_stats=None), data_cfg, info, device,
                          seed=0)
    features = evaluator.real_data()["train_features"]
    with Output(out, check=_reference_stats_only) as partial:  # distgan.output: never over another file
        save_reference_stats(partial, features)
    return {"stats": str(out), "images": len(features), "dim": int(features.shape[1]), "features": evaluator.net.kind,
            "data": data_cfg.path}


def generator_evaluator(meta: dict, source: Path, data_cfg: DataConfig, eval_cfg: EvalConfig, seed: int,
                        device: torch.device) -> tuple[Evaluator, Optional[dict]]:
    """The Evaluator for generators of this metadata (an export's, or a checkpoint's G_ema file's: every
    checkpoint of a run shares it), and train-features' report when the classifier had to be trained first."""
    if not eval_cfg.metrics:
        eval_cfg = dataclasses.replace(eval_cfg, metrics=names())
    info = read_dataset_info(data_cfg.path, allow_pipe=data_cfg.allow_pipe)
    resolution = meta["resolution"] - 2 * meta.get("pad", 0)  # generators come cropped (load_generator_export)
    if (meta["channels"], resolution) != (info.channels, info.resolution):
        raise ConfigError(f"{source} makes {meta['channels']}x{resolution} images but {data_cfg.path} holds "
                          f"{info.channels}x{info.resolution}: pass --data with the run's data")
    trained = ensure_feature_net(eval_cfg, data_cfg.path, info)
    num_classes = len(meta["classes"]) if meta["generator"].get("conditional") else None
    evaluator = Evaluator(eval_cfg, data_cfg, info, device, seed, z_dist=meta["generator"]["z_dist"],
                          num_classes=num_classes)
    return evaluator, trained


def evaluate_export(model: nn.Module, meta: dict, export: Path, data_cfg: DataConfig, eval_cfg: EvalConfig, seed: int,
                    device: torch.device) -> dict:
    """The figures of an exported generator (``model``, ``meta`` as load_generator_export gives them), the
    real-vs-real "reference" and a "meta" record: what ``python -m distgan.eval`` prints."""
    evaluator, trained = generator_evaluator(meta, export, data_cfg, eval_cfg, seed, device)
    start = time.perf_counter()
    figures = evaluator.evaluate(model, rank=0, world_size=1, gather=lambda t: t)
    record: dict = dict(figures)
    reference = evaluator.reference()
    if reference:
        record["reference"] = reference
    record["meta"] = {"export": str(export), "step": meta.get("step"), "n": evaluator.cfg.n, "seed": seed,
                      "metrics": evaluator.cfg.metrics, "features": evaluator.net.kind, "data": data_cfg.path,
                      "test_data": evaluator.test_path, "reference_stats": evaluator.cfg.reference_stats,
                      "seconds": round(time.perf_counter() - start, 2)}
    if trained is not None:
        record["meta"]["feature_classifier_trained"] = trained
    return record
