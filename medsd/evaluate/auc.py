"""Per-label AUC on the test split with bootstrap intervals, the mean over the labels present, and paired
differences between arms (every arm is resampled with the same test indices).

A label whose AUC cannot be measured is NaN with a reason, never 0.5 (notes/medical.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medsd.classifier import auc_per_label

NO_INTERVAL = (math.nan, math.nan)


@dataclass(frozen=True)
class AucScores:
    """AUC per label and their mean, each with a bootstrap interval; ``reasons`` explains every NaN label.

    ``bootstrap_means`` (B,) is the mean AUC of each resample: arms scored with the same seed and test split
    share resamples, so their difference is a paired bootstrap (see :func:`paired_difference`).
    """

    aucs: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    mean: float
    mean_interval: tuple[float, float]
    bootstrap_means: np.ndarray = field(repr=False)
    reasons: dict[str, str]


def score_aucs(
    targets: np.ndarray,
    probabilities: np.ndarray,
    mask: np.ndarray,
    labels: tuple[str, ...] | list[str],
    *,
    bootstrap_samples: int,
    confidence: float,
    seed: int,
    reasons: dict[str, str] | None = None,
) -> AucScores:
    """AUCs of ``probabilities`` (N, L) against ``targets``/``mask`` (N, L); labels in ``reasons`` are NaN."""
    reasons = dict(reasons or {})
    aucs = auc_per_label(targets, probabilities, mask, labels)
    for label, value in aucs.items():
        if math.isnan(value) and label not in reasons:
            reasons[label] = "the test split has one class only for this label"
    aucs = {label: math.nan if label in reasons else value for label, value in aucs.items()}
    present = [i for i, label in enumerate(labels) if label not in reasons]
    mean = float(np.mean([aucs[labels[i]] for i in present])) if present else math.nan

    # Resample test images with replacement; a resample with one class for a label leaves it out of that mean.
    rng = np.random.default_rng(seed)
    resampled = np.full((bootstrap_samples, len(labels)), np.nan)
    for b in range(bootstrap_samples):
        index = rng.integers(0, len(targets), size=len(targets))
        values = auc_per_label(targets[index], probabilities[index], mask[index], labels)
        resampled[b, present] = [values[labels[i]] for i in present]
    with np.errstate(all="ignore"):
        bootstrap_means = np.nanmean(resampled[:, present], axis=1) if present else np.full(bootstrap_samples, np.nan)
    intervals = {
        label: percentile_interval(resampled[:, i], confidence) if i in present else NO_INTERVAL
        for i, label in enumerate(labels)
    }
    return AucScores(aucs, intervals, mean, percentile_interval(bootstrap_means, confidence), bootstrap_means, reasons)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` interval of the finite ``values``; NaN, NaN when there are none."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return NO_INTERVAL
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(arm: AucScores, reference: AucScores, confidence: float) -> tuple[float, tuple[float, float]]:
    """Mean AUC of ``arm`` minus ``reference`` and its paired bootstrap interval (same resamples)."""
    if len(arm.bootstrap_means) != len(reference.bootstrap_means):
        raise ValueError("paired_difference: the two arms were scored with different bootstrap sample counts")
    difference = arm.mean - reference.mean
    return difference, percentile_interval(arm.bootstrap_means - reference.bootstrap_means, confidence)
