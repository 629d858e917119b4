"""Adding a metric is one compute function and one registry entry: config validation, the Evaluator, the
training log and best-checkpoint selection all pick it up.

``brightness_figures`` plays the metric's module and ``BRIGHTNESS`` its registry entry; nothing else changes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distgan.config import ConfigError, load_config
from distgan.metrics import registry
from distgan.metrics.features import CLASSIFIER_FILE, FeatureClassifier, save_classifier
from distgan.metrics.registry import Metric, MetricContext
from distgan.trainer import Trainer


def brightness_figures(ctx: MetricContext) -> dict[str, float]:
    """Mean pixel of the generated images in [0, 1] (and its spread over images)."""
    per_image = ((ctx.images + 1) / 2).mean(dim=(1, 2, 3))
    return {"mean_brightness": float(per_image.mean()), "brightness_std": float(per_image.std())}


BRIGHTNESS = Metric("brightness", ("mean_brightness", "brightness_std"), brightness_figures,
                    higher_is_better=("mean_brightness",), diagnostics=("brightness_std",), needs_images=True)


@pytest.fixture
def brightness():
    registry.register(BRIGHTNESS)
    try:
        yield BRIGHTNESS
    finally:
        registry.unregister(BRIGHTNESS.name)


@pytest.fixture
def shards_with_classifier(fashion_shards, tmp_path) -> Path:
    """The session's 1,000 real images, copied, with an (untrained) feature classifier beside them."""
    data = tmp_path / "fm"
    shutil.copytree(fashion_shards, data)
    torch.manual_seed(0)
    save_classifier(FeatureClassifier(1, 28, 10), data / CLASSIFIER_FILE)
    return data


def test_built_in_metrics_and_directions():
    assert registry.names() == ["fd", "kid", "pr", "classes_covered", "parzen", "class_agreement", "fd_per_class",
                                "is", "is_classifier", "dc"]
    assert registry.all_figures() == ["fd", "kid_x1e3", "kid_std_x1e3", "precision", "recall", "modes_covered",
                                      "kl_to_real", "parzen_ll", "parzen_se", "parzen_sigma", "class_agreement",
                                      "fd_per_class", "fd_worst_class", "is", "is_std", "is_classifier",
                                      "is_classifier_std", "density", "coverage"]
    assert registry.ranked_figures() == ["fd", "kid_x1e3", "precision", "recall", "modes_covered", "kl_to_real",
                                         "parzen_ll", "class_agreement", "fd_per_class", "fd_worst_class", "is",
                                         "is_classifier", "density", "coverage"]
    assert registry.is_better("class_agreement", 0.9, 0.8)
    assert registry.is_better("fd_per_class", 10.0, 20.0) and registry.metric_of("fd_worst_class").needs_conditional
    assert registry.is_better("fd", 1.0, 2.0) and not registry.is_better("fd", 2.0, 1.0)
    assert registry.is_better("recall", 0.9, 0.8) and registry.is_better("parzen_ll", -10.0, -20.0)
    assert registry.is_better("is", 5.0, 4.0) and registry.is_better("coverage", 0.9, 0.8)
    assert not registry.is_better("kid_x1e3", 0.1, 0.1)  # equal is not better: the earlier checkpoint stays
    with pytest.raises(ValueError, match="ranks nothing"):
        registry.is_better("kid_std_x1e3", 0.1, 0.2)


def test_renamed_metrics_and_figures_are_refused_by_their_new_names():
    """`coverage` was the class coverage (now classes_covered; `coverage` is Naeem et al.'s figure of dc), and
    KID's figures are x 10^3 now: an old config fails in one line that names the new name."""
    with pytest.raises(ConfigError, match="'coverage' is now called 'classes_covered'"):
        load_config(None, ["eval.metrics=[fd,coverage]"])
    with pytest.raises(ConfigError, match="'kid' is now called 'kid_x1e3'"):
        load_config(None, ["eval.metrics=[kid]", "eval.best_metric=kid"])
    cfg = load_config(None, ["eval.metrics=[dc,classes_covered]", "eval.best_metric=coverage", "eval.prdc_k=3"])
    assert cfg.eval.best_metric == "coverage" and cfg.eval.prdc_k == 3
    with pytest.raises(ConfigError, match="eval.prdc_k=0"):
        load_config(None, ["eval.prdc_k=0"])


def test_a_registered_metric_is_validated(brightness):
    cfg = load_config(None, ["eval.metrics=[fd,brightness]", "eval.best_metric=mean_brightness"])
    assert cfg.eval.metrics == ["fd", "brightness"]
    with pytest.raises(ConfigError, match="eval.metrics has 'brightnes'.*did you mean 'brightness'"):
        load_config(None, ["eval.metrics=[fd,brightnes]"])
    with pytest.raises(ConfigError, match="eval.best_metric = 'mean_brightnes'.*did you mean 'mean_brightness'"):
        load_config(None, ["eval.metrics=[brightness]", "eval.best_metric=mean_brightnes"])
    with pytest.raises(ConfigError, match="eval.best_metric = 'brightness_std'"):  # a diagnostic ranks nothing
        load_config(None, ["eval.metrics=[brightness]", "eval.best_metric=brightness_std"])
    with pytest.raises(ValueError, match="already"):
        registry.register(brightness)


def test_an_unregistered_metric_is_refused():
    with pytest.raises(ConfigError, match="eval.metrics has 'brightness'"):
        load_config(None, ["eval.metrics=[brightness]"])


@pytest.mark.timeout(300)
def test_a_registered_metric_is_computed_logged_and_keeps_the_best(brightness, shards_with_classifier, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("smoke", [f"data.path={shards_with_classifier}", f"run.dir={run}", "train.steps=30",
                                "checkpoint.every=1000", "log.gif=false", "eval.metrics=[fd,brightness]",
                                "eval.every=10", "eval.n=64", "eval.batch=32", "eval.best_metric=mean_brightness"])
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/mean_brightness" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(0.0 < r["eval/mean_brightness"] < 1.0 and r["eval/brightness_std"] >= 0.0 and r["eval/fd"] > 0
               for r in evals)
    assert len({r["eval/mean_brightness"] for r in evals}) == 3  # distinct values: the direction decides the best
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    brightest = max(evals, key=lambda r: r["eval/mean_brightness"])
    assert best["metric"] == "mean_brightness" and best["step"] == brightest["step"]
    assert best["value"] == brightest["eval/mean_brightness"]
    assert (run / "checkpoints" / "best" / best["checkpoint"] / "G_ema.safetensors").is_file()
