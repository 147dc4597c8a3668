"""The Ray task that measures fidelity, diversity and memorization of each synthetic set, and of the held-out
real split as a reference (what genuinely new images of the same domain score)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from medsd.config import EvaluateConfig
from medsd.evaluate.arms import ArmResult
from medsd.evaluate.diversity import Diversity, prompt_diversity
from medsd.evaluate.features import build_extractor
from medsd.evaluate.fidelity import frechet_distance, knn_precision_recall
from medsd.evaluate.images import PROMPT, ImageSet, shared_arrays_readable
from medsd.evaluate.memorization import MemorizationAudit, calibrated_thresholds, find_nearest_training
from medsd.models import select_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetQuality:
    """Fidelity, diversity and memorization of one set against the real training images.

    ``frechet_distance``/``precision``/``recall`` are NaN (with ``note``) when a set is too small for them.
    """

    name: str
    n_images: int
    is_reference: bool
    frechet_distance: float
    precision: float
    recall: float
    diversity: Diversity
    memorization: MemorizationAudit
    note: str = ""


@dataclass(frozen=True)
class QualityReport:
    """One SetQuality per set (the held-out real reference first), and the feature space used."""

    sets: list[SetQuality]
    extractor: str
    feature_dims: int
    seconds: float


def measure_quality(
    config: dict, real_arm: ArmResult | None, real: ImageSet, test: ImageSet, *variants: ImageSet
) -> QualityReport:
    """Ray task: features of every set with ``config``'s extractor, then each set's metrics against ``real``.

    Memorization thresholds left unset in the config are calibrated on ``test`` (held-out real images).
    """
    cfg = EvaluateConfig.model_validate(config)
    started = time.perf_counter()
    extract = build_extractor(cfg, real_arm.state_dict if real_arm else None, select_device(cfg.device))
    sets = [test, *variants]
    with shared_arrays_readable():
        real_features = extract(real.images)  # (N, D)
        features = [extract(images.images) for images in sets]
    real_sample = _subsample(real_features, cfg.fidelity_max_images, cfg.seed)
    nearest = [
        find_nearest_training(images.images, f, real.images, real_features)
        for images, f in zip(sets, features, strict=True)
    ]
    feature_threshold, pixel_threshold = calibrated_thresholds(nearest[0])
    if cfg.memorization_feature_threshold is not None:
        feature_threshold = cfg.memorization_feature_threshold
    if cfg.memorization_pixel_threshold is not None:
        pixel_threshold = cfg.memorization_pixel_threshold
    results = []
    for number, images in enumerate(sets):
        sample = _subsample(features[number], cfg.fidelity_max_images, cfg.seed + 1 + number)
        note = ""
        if len(sample) > cfg.knn_k:
            frechet = frechet_distance(real_sample, sample)
            precision, recall = knn_precision_recall(real_sample, sample, cfg.knn_k)
        else:
            frechet = precision = recall = math.nan
            note = f"{len(sample)} images: too few for the Frechet distance and k-NN (k={cfg.knn_k}) metrics"
        diversity = prompt_diversity(
            images.images,
            images.frame[PROMPT].astype(str).tolist(),
            cfg.diversity_images_per_prompt,
            cfg.diversity_max_prompts,
        )
        audit = MemorizationAudit(nearest[number], feature_threshold, pixel_threshold)
        results.append(
            SetQuality(images.name, len(images), number == 0, frechet, precision, recall, diversity, audit, note)
        )
    seconds = time.perf_counter() - started
    logger.info("fidelity, diversity and memorization of %d sets in %.0f s", len(results), seconds)
    return QualityReport(results, cfg.extractor, real_features.shape[1], seconds)


def _subsample(features: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    if len(features) <= max_rows:
        return features
    return features[np.sort(np.random.default_rng(seed).choice(len(features), size=max_rows, replace=False))]
