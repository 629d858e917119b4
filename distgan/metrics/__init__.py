"""Sample-quality metrics as pure functions of features or labels, and the feature networks that produce them.

Every metric takes tensors (or numpy arrays) and returns plain floats/dicts, computed in float64 and
deterministic for a given input (and seed, where there is randomness). Nothing here touches Accelerate.
"""
from .coverage import class_coverage
from .features import (
    FeatureClassifier,
    classify,
    evaluate_classifier,
    extract_features,
    load_classifier,
    save_classifier,
    train_classifier,
)
from .inception import FIDInceptionV3, load_inception_features
from .frechet import feature_stats, frechet_distance, frechet_distance_from_features
from .kid import kernel_inception_distance
from .parzen import parzen_log_likelihood, parzen_log_likelihoods, select_parzen_sigma
from .precision_recall import precision_recall

__all__ = [
    "FIDInceptionV3",
    "FeatureClassifier",
    "class_coverage",
    "classify",
    "evaluate_classifier",
    "extract_features",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "load_classifier",
    "load_inception_features",
    "parzen_log_likelihood",
    "parzen_log_likelihoods",
    "precision_recall",
    "save_classifier",
    "select_parzen_sigma",
    "train_classifier",
]
