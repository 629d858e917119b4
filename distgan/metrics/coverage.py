"""Mode coverage: how many classes a generator's samples fall into, and how far its class mix is from the data's.

The labels come from a classifier trained on the real data (see features.FeatureClassifier).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from distgan.metrics.registry import MetricContext

KL_EPS = 1e-6  # added to every fake class share before KL, so a dropped mode costs a large finite amount


def class_coverage(
    pred_labels: Tensor,
    num_classes: int,
    real_hist: Optional[Tensor] = None,
    min_share: float = 0.0,
) -> dict:
    """Class histogram of predicted labels, modes covered and KL(real || fake).

    A class is covered when its share of the samples is above ``min_share`` (0 means at least one sample).
    ``real_hist`` holds counts or shares per class; None means uniform (balanced data such as (Fashion-)MNIST).
    """
    labels = torch.as_tensor(pred_labels).detach().to("cpu").reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_coverage: pred_labels is empty")
    if labels.is_floating_point() or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"class_coverage: pred_labels must be integers in [0, {num_classes}), "
            f"got dtype {labels.dtype}, range [{labels.min().item()}, {labels.max().item()}]"
        )
    counts = np.bincount(labels.numpy().astype(np.int64), minlength=num_classes)
    shares = counts / counts.sum()
    if real_hist is None:
        real = np.full(num_classes, 1.0 / num_classes)
    else:
        real = np.asarray(torch.as_tensor(real_hist, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
        if real.shape != (num_classes,) or (real < 0).any() or real.sum() <= 0:
            raise ValueError(
                f"class_coverage: real_hist must be {num_classes} non-negative counts or shares, got {real.tolist()}"
            )
        real = real / real.sum()
    fake = (shares + KL_EPS) / (1.0 + num_classes * KL_EPS)
    support = real > 0
    kl = float(np.sum(real[support] * np.log(real[support] / fake[support])))
    return {
        "modes_covered": int((shares > min_share).sum()),
        "num_classes": num_classes,
        "kl_to_real": kl,
        "histogram": shares.tolist(),
        "counts": counts.tolist(),
    }


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"modes_covered", "kl_to_real"}: the sample's classifier labels against the real train labels' mix."""
    hist = torch.bincount(ctx.real["train_labels"], minlength=ctx.num_classes)
    cov = class_coverage(ctx.labels, ctx.num_classes, real_hist=hist)
    return {"modes_covered": float(cov["modes_covered"]), "kl_to_real": cov["kl_to_real"]}
