"""The utility arms: which images each classifier trains on, with the same seed and the same budget (images
seen, to the image: a pass that would overrun it is cut short), and the Ray task that trains one arm and
scores it on the held-out real test split.

Arms: real only, synthetic only, real + synthetic, synthetic pre-training then real fine-tuning (RoentGen-v2's
recipe), plus, for sweeps, synthetic only on each folder and guidance scale.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medsd.classifier import _fit, build_classifier, predict_probabilities
from medsd.config import EvaluateConfig
from medsd.evaluate.auc import AucScores, score_aucs
from medsd.evaluate.images import ImageSet, shared_arrays_readable
from medsd.evaluate.inputs import EvaluationInputs, unmeasurable_labels
from medsd.models import select_device

logger = logging.getLogger(__name__)

REAL, SYNTHETIC, MIXED, PRETRAIN_FINETUNE = "real", "synthetic", "mixed", "pretrain_finetune"
ARM_TITLES = {
    REAL: "Real images",
    SYNTHETIC: "Synthetic only",
    MIXED: "Real + synthetic",
    PRETRAIN_FINETUNE: "Synthetic pre-training, real fine-tuning",
}
VARIANT_PREFIX = "synthetic:"  # sweep arms are named synthetic:<variant>; the synthetic arm stands for its own


@dataclass(frozen=True)
class Stage:
    """Train on the set ``set_name`` until ``images`` images have been seen (shuffled passes, the last one cut
    short); a later stage continues the same model."""

    set_name: str
    images: int


@dataclass(frozen=True)
class ArmPlan:
    """One classifier to train: its stages in order, whether its weights come back (feature extraction), and
    the synthetic variant it trained on alone (a point of the sweep)."""

    name: str
    title: str
    stages: tuple[Stage, ...]
    keeps_model: bool = False
    variant: str | None = None


@dataclass(frozen=True)
class ArmResult:
    """A trained and scored arm. ``state_dict`` only for an arm planned with ``keeps_model``."""

    plan: ArmPlan
    scores: AucScores
    n_train: int
    images_seen: int
    seconds: float
    state_dict: dict | None = None


def training_sets(cfg: EvaluateConfig, inputs: EvaluationInputs) -> dict[str, ImageSet]:
    """Every set an arm may train on, by name; with ``equal_size`` synthetic sets are subsampled to the real count."""
    rng = np.random.default_rng(cfg.seed)

    def sized(images: ImageSet) -> ImageSet:
        if not cfg.equal_size or len(images) <= len(inputs.real):
            return images
        return images.sample(len(inputs.real), rng)

    synthetic = sized(inputs.synthetic)
    sets = {REAL: inputs.real, SYNTHETIC: synthetic, MIXED: ImageSet.concatenate(MIXED, [inputs.real, synthetic])}
    if cfg.sweep and len(inputs.variants) > 1:  # the variant the synthetic arm already trains on is not repeated
        others = [v for i, v in enumerate(inputs.variants) if i != inputs.primary]
        sets.update({VARIANT_PREFIX + variant.name: sized(variant) for variant in others})
    return sets


def plan_arms(cfg: EvaluateConfig, sets: dict[str, ImageSet], primary: str | None = None) -> list[ArmPlan]:
    """The arms of ``cfg``; each sees exactly budget = epochs x real images in total.

    Whole passes only would not do: rounding to them gave real + synthetic 6% fewer images than real only.
    ``primary``: the name of the variant the synthetic arm trains on, when it is exactly one variant.
    """
    budget = cfg.epochs * len(sets[REAL])
    pretrain = max(1, round(budget * cfg.pretrain_fraction))
    stages = {
        REAL: (Stage(REAL, budget),),
        SYNTHETIC: (Stage(SYNTHETIC, budget),),
        MIXED: (Stage(MIXED, budget),),
        PRETRAIN_FINETUNE: (Stage(SYNTHETIC, pretrain), Stage(REAL, budget - pretrain)),
    }
    plans = [
        ArmPlan(
            arm,
            ARM_TITLES[arm],
            stages[arm],
            keeps_model=arm == REAL and cfg.extractor == "classifier",
            variant=primary if arm == SYNTHETIC else None,
        )
        for arm in cfg.arms
    ]
    for name in sets:
        if name.startswith(VARIANT_PREFIX):
            variant = name.removeprefix(VARIANT_PREFIX)
            plans.append(ArmPlan(name, f"Synthetic only, {variant}", (Stage(name, budget),), variant=variant))
    return plans


def train_and_score(plan: ArmPlan, config: dict, test: ImageSet, *stage_sets: ImageSet) -> ArmResult:
    """Ray task: train ``plan``'s classifier on ``stage_sets`` (one per stage, in order), score it on ``test``."""
    cfg = EvaluateConfig.model_validate(config)
    started = time.perf_counter()
    device = select_device(cfg.device)
    model = None
    with shared_arrays_readable():
        for stage, images in zip(plan.stages, stage_sets, strict=True):
            model = fit_classifier(images, stage.images, cfg, device, start=model)
        probabilities = predict_probabilities(model, test.images)
    scores = score_aucs(
        test.targets,
        probabilities,
        test.mask,
        test.labels,
        bootstrap_samples=cfg.bootstrap_samples,
        confidence=cfg.confidence,
        seed=cfg.seed,
        reasons={**unmeasurable_labels(test), **untrainable_labels(stage_sets)},
    )
    seconds = time.perf_counter() - started
    logger.info("arm %s: mean AUC %.3f in %.0f s", plan.name, scores.mean, seconds)
    return ArmResult(
        plan,
        scores,
        n_train=sum(len(images) for images in stage_sets),
        images_seen=sum(stage.images for stage in plan.stages),
        seconds=seconds,
        state_dict={k: v.cpu() for k, v in model.state_dict().items()} if plan.keeps_model else None,
    )


def fit_classifier(
    images: ImageSet, images_to_see: int, cfg: EvaluateConfig, device: torch.device, start: nn.Module | None
) -> nn.Module:
    """Train ``start`` (or a fresh classifier from ``cfg.weights_path`` / random init) on ``images`` until it has
    seen ``images_to_see`` of them.

    medsd.classifier.train_classifier always starts from a fresh random model; fine-tuning a pre-trained arm and
    starting from local weights need its loop on a given model, hence its ``_fit``. Seeded, and the global
    torch RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device.index or 0]):
        torch.manual_seed(cfg.seed)
        model = start or build_classifier(len(images.labels), cfg.architecture, cfg.weights_path).to(device)
        _fit(
            model,
            images.images,
            images.targets,
            images.mask,
            images_to_see,
            cfg.batch_size,
            cfg.learning_rate,
            cfg.seed,
            device,
        )
    return model.eval()


def untrainable_labels(stage_sets: tuple[ImageSet, ...]) -> dict[str, str]:
    """label -> why the arm cannot rank it: its training images hold no positives (or no negatives)."""
    positives = sum(images.class_counts()[0] for images in stage_sets)
    negatives = sum(images.class_counts()[1] for images in stage_sets)
    names = " + ".join(images.name for images in stage_sets)
    return {
        label: f"the training images ({names}) have {p} positive and {n} negative examples of it"
        for label, p, n in zip(stage_sets[0].labels, positives, negatives, strict=True)
        if p == 0 or n == 0
    }
