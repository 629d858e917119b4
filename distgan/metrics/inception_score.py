"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

The protocol of the original code and torch-fidelity: the samples shuffled (numpy RandomState(seed)), cut
into ``splits`` consecutive parts, the score computed per part in float64; mean and (population) std over
the parts. ``is`` reads Inception's logits without the head's bias (the original code's); ``is_classifier``
reads distgan's feature classifier's logits (a score over the data's own classes, bounded by their count).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distgan.metrics.registry import MetricContext

SPLITS = 10


def inception_score(logits: Tensor | np.ndarray, splits: int = SPLITS, seed: int = 0) -> tuple[float, float]:
    """Mean and std over ``splits`` parts of exp(mean KL(p(y|x) || p(y))), p(y|x) = softmax(logits) [N, K]."""
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"inception_score: logits must be [N, K >= 2], got {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits={splits} must be in [1, {n}] (the number of samples)")
    if not torch.isfinite(logits).all():
        raise ValueError("inception_score: logits contain NaN or Inf (did the generator diverge?)")
    logits = logits[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = part.exp().mean(dim=0).log()
        scores.append(float((part.exp() * (part - log_marginal)).sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"is", "is_std"}: the sample's Inception logits."""
    mean, std = inception_score(ctx.logits, splits=min(SPLITS, len(ctx.logits)), seed=ctx.seed)
    return {"is": mean, "is_std": std}


def classifier_figures(ctx: MetricContext) -> dict[str, float]:
    """{"is_classifier", "is_classifier_std"}: the sample's feature-classifier logits."""
    mean, std = inception_score(ctx.class_logits, splits=min(SPLITS, len(ctx.class_logits)), seed=ctx.seed)
    return {"is_classifier": mean, "is_classifier_std": std}
