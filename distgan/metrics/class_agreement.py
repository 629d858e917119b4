"""Class agreement of a class-conditional generator: the share of the images generated for class K that the
feature classifier assigns to K (its real-vs-real reference is the classifier's accuracy on the test split)."""
from __future__ import annotations

from torch import Tensor

from distgan.metrics.registry import MetricContext


def class_agreement(predicted: Tensor, conditioned: Tensor) -> float:
    """Share of samples whose predicted class is the class they were generated for."""
    if predicted.shape != conditioned.shape or predicted.numel() == 0:
        raise ValueError(f"class_agreement: predicted {tuple(predicted.shape)} and conditioned "
                         f"{tuple(conditioned.shape)} must be equal, non-empty shapes")
    return float((predicted.long() == conditioned.long()).double().mean())


def figures(ctx: MetricContext) -> dict[str, float]:
    """{"class_agreement"}: the classifier's labels of the sample against the classes it was generated for."""
    return {"class_agreement": class_agreement(ctx.labels, ctx.conditioned)}
