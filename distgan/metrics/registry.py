"""The metric registry: each metric's name, the figures it produces, which way is better, and how to compute it.

Config validation (eval.metrics, eval.best_metric), the Evaluator, best-checkpoint selection and the results
table all read ``METRICS``. Adding a metric is its module (a pure function plus a ``figures(ctx)`` glue
function) and one ``register(Metric(...))``. This file imports neither torch nor the metric modules: the
config validates metric names without loading the metrics stack (built-in compute functions load on first use).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class MetricContext:
    """What a metric judges: one sample (generated images, or the test split for the real-vs-real reference)."""

    features: Tensor  # float32 [N, D] (CPU): the sample's features from the feature network
    labels: Optional[Tensor]  # int64 [N]: the classifier's labels of the sample; None without a classifier
    images: Optional[Tensor]  # float32 [N, C, R, R] in [-1, 1] when a metric needs_images, else None; for the
    # reference: real train images (those of the Parzen window)
    real: Mapping[str, Tensor]  # the Evaluator's real data (train_features, train_labels, test_parzen_images ...)
    num_classes: Optional[int]  # classes of the classifier (None without one)
    conditioned: Optional[Tensor]  # int64 [N]: the class each image was generated for (conditional G; for the
    # reference: the test images' own labels); None for an unconditional generator
    seed: int  # for a metric's own randomness (subsets): fixed, so figures compare across runs
    memo: dict  # kept by one Evaluator across evaluations: statistics of the real data computed once
    logits: Optional[Tensor] = None  # float [N, 1008]: Inception's logits (no head bias) when needs_inception_logits
    class_logits: Optional[Tensor] = None  # float [N, K]: the feature classifier's logits (None without one)
    prdc_k: int = 5  # eval.prdc_k: neighbours of density and coverage


@dataclass(frozen=True)
class Metric:
    """One metric: ``compute(ctx)`` returns a dict with every name of ``figures`` (floats)."""

    name: str  # what eval.metrics lists
    figures: tuple[str, ...]  # what it produces: logged as eval/<figure>
    compute: Callable[[MetricContext], dict[str, float]]
    higher_is_better: tuple[str, ...] = ()  # figures where higher is better; lower is better for the rest
    diagnostics: tuple[str, ...] = ()  # figures that rank nothing (std errors, chosen bandwidths): no best_metric
    needs_labels: bool = False  # needs the classifier's labels: skipped (with a warning) without the classifier
    needs_test_split: bool = False  # needs the test split: skipped (with a warning) without one
    needs_images: bool = False  # needs the generated images themselves, not only their features
    needs_conditional: bool = False  # needs a class-conditional generator: skipped (with a warning) otherwise
    needs_inception_logits: bool = False  # needs Inception's 1008 logits: eval.features=inception with a .pth head
    title: str = ""  # what warnings call it (default: the name)
    columns: tuple[tuple[str, str], ...] = ()  # results table: (header, str.format template over the figures)

    def __post_init__(self) -> None:
        for field_name in ("higher_is_better", "diagnostics"):
            extra = set(getattr(self, field_name)) - set(self.figures)
            if extra:
                raise ValueError(f"metric {self.name!r}: {field_name} has {sorted(extra)}, not among its figures "
                                 f"{list(self.figures)}")
        if set(self.higher_is_better) & set(self.diagnostics):
            raise ValueError(f"metric {self.name!r}: a figure cannot be both higher_is_better and a diagnostic")

    @property
    def ranked(self) -> tuple[str, ...]:
        """The figures a best checkpoint can be chosen by."""
        return tuple(f for f in self.figures if f not in self.diagnostics)


def lazy(module: str, function: str = "figures") -> Callable[[MetricContext], dict[str, float]]:
    """A compute function imported from ``module`` on its first call."""
    def compute(ctx: MetricContext) -> dict[str, float]:
        return getattr(importlib.import_module(module), function)(ctx)

    compute.__qualname__ = f"{module}.{function}"
    return compute


METRICS: dict[str, Metric] = {}
RENAMED = {"coverage": "classes_covered"}  # old metric names: refused by config validation, naming the new one
RENAMED_FIGURES = {"kid": "kid_x1e3", "kid_std": "kid_std_x1e3"}  # old figure names (eval.best_metric)


def register(metric: Metric) -> Metric:
    """Add a metric; its name and figures must be new (a figure names one metric's output)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    taken = set(metric.figures) & set(all_figures())
    if taken:
        raise ValueError(f"metric {metric.name!r}: figures {sorted(taken)} are already produced by "
                         + ", ".join(sorted({metric_of(f).name for f in taken})))
    METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    METRICS.pop(name, None)


def names() -> list[str]:
    """Registered metric names, in registration order (the default of eval.metrics where one is needed)."""
    return list(METRICS)


def all_figures() -> list[str]:
    """Every figure some metric produces."""
    return [f for m in METRICS.values() for f in m.figures]


def ranked_figures() -> list[str]:
    """The figures eval.best_metric may name."""
    return [f for m in METRICS.values() for f in m.ranked]


def metric_of(figure: str) -> Metric:
    for metric in METRICS.values():
        if figure in metric.figures:
            return metric
    raise KeyError(f"no registered metric produces the figure {figure!r} (figures: {', '.join(all_figures())})")


def is_better(figure: str, a: float, b: float) -> bool:
    """Whether ``a`` is a strictly better value of ``figure`` than ``b``."""
    metric = metric_of(figure)
    if figure in metric.diagnostics:
        raise ValueError(f"{figure!r} ranks nothing (a diagnostic of {metric.name}); rank by one of "
                         + ", ".join(metric.ranked))
    return a > b if figure in metric.higher_is_better else a < b


# ---------------------------------------------------------------- the built-in metrics

register(Metric("fd", ("fd",), lazy("distgan.metrics.frechet"), columns=(("fd", "{fd:.4g}"),)))
# KID figures are MMD^2 x 10^3, as papers and torch-fidelity's tables print them (the name says so)
register(Metric("kid", ("kid_x1e3", "kid_std_x1e3"), lazy("distgan.metrics.kid"), diagnostics=("kid_std_x1e3",),
                columns=(("KID x1e3", "{kid_x1e3:.4g}"),)))
register(Metric("pr", ("precision", "recall"), lazy("distgan.metrics.precision_recall"),
                higher_is_better=("precision", "recall"),
                columns=(("precision", "{precision:.3f}"), ("recall", "{recall:.3f}"))))
register(Metric("classes_covered", ("modes_covered", "kl_to_real"), lazy("distgan.metrics.coverage"),
                higher_is_better=("modes_covered",), needs_labels=True, title="classes covered",
                columns=(("modes covered", "{modes_covered:.0f}"), ("KL to real", "{kl_to_real:.3g}"))))
register(Metric("parzen", ("parzen_ll", "parzen_se", "parzen_sigma"), lazy("distgan.metrics.parzen"),
                higher_is_better=("parzen_ll",), diagnostics=("parzen_se", "parzen_sigma"), needs_test_split=True,
                needs_images=True, title="Parzen log-likelihood",
                columns=(("Parzen LL (se)", "{parzen_ll:.1f} ({parzen_se:.2f})"),)))
register(Metric("class_agreement", ("class_agreement",), lazy("distgan.metrics.class_agreement"),
                higher_is_better=("class_agreement",), needs_labels=True, needs_conditional=True,
                title="class agreement", columns=(("class agreement", "{class_agreement:.3f}"),)))
register(Metric("fd_per_class", ("fd_per_class", "fd_worst_class"), lazy("distgan.metrics.fd_per_class"),
                needs_conditional=True, title="per-class Frechet distance",
                columns=(("fd per class (worst)", "{fd_per_class:.4g} ({fd_worst_class:.4g})"),)))
register(Metric("is", ("is", "is_std"), lazy("distgan.metrics.inception_score"), higher_is_better=("is",),
                diagnostics=("is_std",), needs_inception_logits=True, title="Inception Score",
                columns=(("IS", "{is:.3f}"),)))
register(Metric("is_classifier", ("is_classifier", "is_classifier_std"),
                lazy("distgan.metrics.inception_score", "classifier_figures"), higher_is_better=("is_classifier",),
                diagnostics=("is_classifier_std",), needs_labels=True, title="Inception Score of the feature classifier",
                columns=(("IS (classifier)", "{is_classifier:.3f}"),)))
register(Metric("dc", ("density", "coverage"), lazy("distgan.metrics.density_coverage"),
                higher_is_better=("density", "coverage"), title="density and coverage",
                columns=(("density", "{density:.3f}"), ("coverage", "{coverage:.3f}"))))
