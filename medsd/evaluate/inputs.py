"""Every image an evaluation needs, checked before any classifier trains: real training and test splits, the
synthetic folders, the set the arms train on, and the sweep variants."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from medsd.config import EvaluateConfig
from medsd.evaluate.images import ImageSet, decode_image_set
from medsd.evaluate.synthetic import (
    SyntheticFolder,
    primary_variant,
    read_synthetic_folder,
    select_guidance,
    split_variants,
)
from medsd.labels import PATH_COLUMN

logger = logging.getLogger(__name__)

# CheXpert Paths name the patient (.../patient00042/study1/...): a held-out split keeps a patient's images together.
PATIENT_PATTERN = re.compile(r"patient\d+")


@dataclass
class EvaluationInputs:
    """The decoded sets. ``synthetic`` trains the arms; ``variants`` are one set per folder and guidance scale,
    ``variants[primary]`` the one identical to ``synthetic`` (None when the arms train on several scales)."""

    real: ImageSet
    test: ImageSet
    synthetic: ImageSet
    variants: list[ImageSet]
    folders: list[SyntheticFolder]
    primary: int | None = None


def load_inputs(cfg: EvaluateConfig) -> EvaluationInputs:
    """Decode and check every set ``cfg`` names (on the current Ray); raises before any training on bad input."""
    real = decode_image_set("real", cfg.real, cfg.labels)
    if cfg.test_csv is None:
        real, test = hold_out_patients(real, cfg.test_fraction, cfg.seed)
    else:
        test_data = cfg.real.model_copy(update={"csv": cfg.test_csv, "root": cfg.test_root or cfg.real.root})
        test = decode_image_set("test", test_data, cfg.labels)
    unmeasurable_labels(test)  # raises now, before any training, when no label can be measured
    if cfg.real_max_images is not None:
        real = subsample(real, cfg.real_max_images, cfg.seed)
    folders = [
        read_synthetic_folder(f"synthetic[{i}]", folder, cfg.real, cfg.labels) for i, folder in enumerate(cfg.synthetic)
    ]
    synthetic = select_guidance(folders[0].images, cfg.guidance_scale)
    logger.info(
        "evaluation sets: %d real training, %d test, %d synthetic (%s) images",
        len(real),
        len(test),
        len(synthetic),
        ", ".join(f"{f.path}: {len(f.images)}" for f in folders),
    )
    variants = split_variants(folders)
    return EvaluationInputs(real, test, synthetic, variants, folders, primary_variant(folders, cfg.guidance_scale))


def hold_out_patients(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, test): a seeded ``fraction`` of patients (Paths without a patient id: single images) held out."""
    paths = images.frame[PATH_COLUMN].astype(str)
    groups = np.array([match.group(0) if (match := PATIENT_PATTERN.search(p)) else p for p in paths])
    names = np.unique(groups)
    rng = np.random.default_rng(seed)
    n_test = min(len(names) - 1, max(1, round(fraction * len(names))))
    if n_test < 1:
        raise ValueError(f"real: {len(images)} images of one patient cannot be split; pass --test CSV")
    held = np.isin(groups, rng.choice(names, size=n_test, replace=False))
    return images.subset(~held, name="real"), images.subset(held, name="test (held-out real patients)")


def subsample(images: ImageSet, max_images: int, seed: int) -> ImageSet:
    """A seeded subsample of at most ``max_images`` of ``images``, kept in their original order."""
    if len(images) <= max_images:
        return images
    logger.info("real training images: a seeded subsample of %d of %d (real_max_images)", max_images, len(images))
    return images.sample(max_images, np.random.default_rng([seed, max_images]))


def unmeasurable_labels(test: ImageSet) -> dict[str, str]:
    """label -> why its AUC is NaN on ``test`` (one class only); ValueError when no label can be measured."""
    positives, negatives = test.class_counts()
    reasons = {
        label: f"the test split has {p} positive and {n} negative images (AUC needs both)"
        for label, p, n in zip(test.labels, positives, negatives, strict=True)
        if p == 0 or n == 0
    }
    if len(reasons) == len(test.labels):
        counts = ", ".join(f"{label} {p}+/{n}-" for label, p, n in zip(test.labels, positives, negatives, strict=True))
        raise ValueError(
            f"test: no label has both positive and negative images ({counts}), so every AUC is undefined; "
            "use a test split with positives (e.g. CheXpert valid.csv) or other evaluate.labels"
        )
    return reasons
