"""medsd.evaluate arm planning and the pieces around it, on small in-memory sets: equal budgets, equal-size
subsampling, NaN reasons, fine-tuning continuity, held-out patients and sweep variants (no Ray)."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medsd.classifier import build_classifier
from medsd.config import EvaluateConfig, load_config
from medsd.evaluate.arms import (
    MIXED,
    PRETRAIN_FINETUNE,
    REAL,
    SYNTHETIC,
    fit_classifier,
    plan_arms,
    training_sets,
    untrainable_labels,
)
from medsd.evaluate.images import GUIDANCE_SCALE, PROMPT, ImageSet
from medsd.evaluate.inputs import EvaluationInputs, hold_out_patients, subsample, unmeasurable_labels
from medsd.evaluate.synthetic import SyntheticFolder, primary_variant, select_guidance, split_variants
from medsd.labels import PATH_COLUMN

LABELS = ("Cardiomegaly", "Edema")


def image_set(name: str, n: int, seed: int, positives=(True, True), scales=(math.nan,)) -> ImageSet:
    """``n`` random 32 px images per guidance scale; label i has positives only if ``positives[i]``."""
    rng = np.random.default_rng(seed)
    rows = n * len(scales)
    targets = rng.integers(0, 2, size=(rows, len(LABELS))).astype(np.float32) * np.array(positives, np.float32)
    targets[0] = 0  # at least one negative per label
    frame = pd.DataFrame(
        {
            PATH_COLUMN: [f"train/patient{i // 2:05d}/study1/view1_frontal.png" for i in range(rows)],
            PROMPT: ["p"] * rows,
            GUIDANCE_SCALE: np.repeat(scales, n),
        }
    )
    images = rng.integers(0, 256, size=(rows, 32, 32), dtype=np.uint8)
    return ImageSet(name, images, targets, np.ones_like(targets), frame, LABELS)


def config(**overrides) -> EvaluateConfig:
    settings = ["real.csv=r.csv", "synthetic=[s]", f"labels={list(LABELS)}"]
    return load_config(EvaluateConfig, None, settings + [f"{k}={v}" for k, v in overrides.items()])


def inputs(real: ImageSet, synthetic: ImageSet, variants: list[ImageSet] | None = None) -> EvaluationInputs:
    return EvaluationInputs(real, real, synthetic, variants or [synthetic], [])


def images_seen(plan, sets) -> int:
    return sum(stage.images for stage in plan.stages)


def test_every_arm_gets_the_same_budget_of_images_seen():
    cfg = config(epochs=2, pretrain_fraction=0.5)
    sets = training_sets(cfg, inputs(image_set("real", 100, 0), image_set("synthetic", 100, 1)))
    plans = {plan.name: plan for plan in plan_arms(cfg, sets)}
    assert list(plans) == [REAL, SYNTHETIC, MIXED, PRETRAIN_FINETUNE]
    assert {name: images_seen(plan, sets) for name, plan in plans.items()} == dict.fromkeys(plans, 200)
    assert [stage.set_name for stage in plans[PRETRAIN_FINETUNE].stages] == [SYNTHETIC, REAL]
    assert plans[REAL].keeps_model and not plans[SYNTHETIC].keeps_model
    assert len(sets[MIXED]) == 200

    # Set sizes that do not divide the budget: still exactly the budget (the last pass is cut short).
    cfg = config(epochs=3, pretrain_fraction=0.3)
    sets = training_sets(cfg, inputs(image_set("real", 100, 0), image_set("synthetic", 70, 1)))
    plans = {plan.name: plan for plan in plan_arms(cfg, sets)}
    assert {name: images_seen(plan, sets) for name, plan in plans.items()} == dict.fromkeys(plans, 300)
    assert [stage.images for stage in plans[PRETRAIN_FINETUNE].stages] == [90, 210]


def test_equal_size_subsamples_synthetic_sets_and_sweeps_get_one_arm_per_variant():
    real, synthetic = image_set("real", 40, 0), image_set("synthetic", 60, 1, scales=(2.0, 6.0))
    variants = split_variants([SyntheticFolder(Path("/x/synthetic"), synthetic, None, None)])
    cfg = config(equal_size=True)
    sets = training_sets(cfg, inputs(real, synthetic, variants))
    assert len(sets[SYNTHETIC]) == 40 and all(len(sets[f"synthetic:{v.name}"]) == 40 for v in variants)
    chosen = sets[SYNTHETIC].frame[GUIDANCE_SCALE]
    assert set(chosen) == {2.0, 6.0}  # a seeded subsample across both scales, not the first 40 rows
    assert (
        sets[SYNTHETIC].images.tobytes()
        == training_sets(cfg, inputs(real, synthetic, variants))[SYNTHETIC].images.tobytes()
    )
    sweep = [plan for plan in plan_arms(cfg, sets) if plan.variant is not None]
    assert len(sweep) == 2 and sweep[0].title.startswith("Synthetic only, ")
    assert not [
        p
        for p in plan_arms(config(sweep=False), training_sets(config(sweep=False), inputs(real, synthetic, variants)))
        if p.variant
    ]


def test_the_variant_the_synthetic_arm_trains_on_is_not_trained_twice():
    folders = [
        SyntheticFolder(Path("/x/ckpt-500"), image_set("synthetic[0]", 20, 0, scales=(4.0,)), None, None),
        SyntheticFolder(Path("/x/ckpt-900"), image_set("synthetic[1]", 20, 1, scales=(4.0,)), None, None),
    ]
    variants = split_variants(folders)
    assert primary_variant(folders, None) == 0 and primary_variant(folders, 4.0) == 0
    cfg = config()
    evaluation = EvaluationInputs(folders[0].images, folders[0].images, folders[0].images, variants, folders, primary=0)
    plans = plan_arms(cfg, training_sets(cfg, evaluation), primary=variants[0].name)
    assert [(plan.name, plan.variant) for plan in plans if plan.variant] == [
        (SYNTHETIC, "0:ckpt-500 g4"),
        ("synthetic:1:ckpt-900 g4", "1:ckpt-900 g4"),
    ]
    several_scales = [SyntheticFolder(Path("/x/a"), image_set("synthetic[0]", 5, 0, scales=(2.0, 6.0)), None, None)]
    assert primary_variant(several_scales, None) is None and primary_variant(several_scales, 6.0) == 1


def test_labels_without_positives_get_a_reason_not_a_score():
    no_edema = image_set("synthetic[0]", 30, 2, positives=(True, False))
    reasons = untrainable_labels((no_edema,))
    assert list(reasons) == ["Edema"] and "0 positive" in reasons["Edema"] and "synthetic[0]" in reasons["Edema"]
    assert untrainable_labels((no_edema, image_set("real", 30, 3))) == {}  # fine-tuning on real brings positives

    test = image_set("test", 30, 4, positives=(True, False))
    assert "0 positive" in unmeasurable_labels(test)["Edema"]
    with pytest.raises(ValueError, match="no label has both positive and negative"):
        unmeasurable_labels(image_set("test", 30, 4, positives=(False, False)))


def test_fine_tuning_continues_the_pretrained_model_and_fresh_training_is_seeded(tmp_path):
    cfg = config(batch_size=8, seed=1)
    first, second = image_set("a", 24, 0), image_set("b", 24, 1)
    device = torch.device("cpu")
    pretrained = fit_classifier(first, len(first), cfg, device, start=None)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    again = fit_classifier(first, len(first), cfg, device, start=None)
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())  # same seed, same weights
    tuned = fit_classifier(second, len(second), cfg, device, start=pretrained)
    assert tuned is pretrained and not torch.equal(before["fc.weight"], tuned.fc.weight)

    # Starting weights from a local file: the fresh model starts from them, not from random init.
    start = build_classifier(len(LABELS))
    torch.nn.init.constant_(start.fc.bias, 5.0)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    from_file = fit_classifier(first, 24, config(batch_size=8, weights_path=str(tmp_path / "start.pt")), device, None)
    assert from_file.fc.bias.mean() > 4.0  # a few small AdamW steps from 5, not from about 0


def test_held_out_patients_stay_together_and_are_seeded():
    images = image_set("real", 40, 0)  # two images per patient
    train, test = hold_out_patients(images, 0.25, seed=0)
    assert len(train) + len(test) == 40 and len(test) == 10
    patient = lambda s: set(s.frame[PATH_COLUMN].str.extract(r"(patient\d+)")[0])  # noqa: E731
    assert not patient(train) & patient(test)
    assert hold_out_patients(images, 0.25, seed=0)[1].frame.equals(test.frame)
    assert not hold_out_patients(images, 0.25, seed=1)[1].frame.equals(test.frame)


def test_scarce_real_labels_are_a_seeded_subsample_in_the_original_order():
    images = image_set("real", 40, 0)
    images.frame[PATH_COLUMN] = [f"image{i}.png" for i in range(40)]  # one name per image, to find each again
    kept = subsample(images, 10, seed=0)
    paths = list(images.frame[PATH_COLUMN])
    positions = [paths.index(path) for path in kept.frame[PATH_COLUMN]]
    assert len(kept) == 10 and positions == sorted(set(positions))
    assert np.array_equal(kept.images, images.images[positions]) and np.array_equal(
        kept.targets, images.targets[positions]
    )
    assert subsample(images, 10, seed=0).frame.equals(kept.frame)
    assert not subsample(images, 10, seed=1).frame.equals(kept.frame)
    assert subsample(images, 40, seed=0) is images  # nothing to drop
    plan = plan_arms(config(epochs=4), {REAL: kept, SYNTHETIC: images, MIXED: images})
    assert {images_seen(arm, None) for arm in plan} == {40}  # the budget follows the images kept
    with pytest.raises(ValueError, match="real_max_images"):
        config(real_max_images=1)


def test_variants_are_one_per_folder_and_guidance_scale():
    swept = image_set("synthetic[0]", 5, 0, scales=(2.0, 6.0))
    plain = image_set("synthetic[1]", 5, 1)
    folders = [
        SyntheticFolder(Path("/x/ckpt-500"), swept, None, None),
        SyntheticFolder(Path("/x/ckpt-900"), plain, None, None),
    ]
    variants = split_variants(folders)
    assert [v.name for v in variants] == ["0:ckpt-500 g2", "0:ckpt-500 g6", "1:ckpt-900"]
    assert [len(v) for v in variants] == [5, 5, 5]
    assert [v.name for v in split_variants(folders[:1])] == ["g2", "g6"]
    with pytest.raises(ValueError, match=r"guidance_scale: 4.0 is not in synthetic\[0\] \(its scales: \[2.0, 6.0\]\)"):
        select_guidance(swept, 4.0)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="evaluate.real.csv: not set"):
        load_config(EvaluateConfig, None, ["synthetic=[s]"])
    with pytest.raises(ValueError, match="evaluate.synthetic: no folder given"):
        load_config(EvaluateConfig, None, ["real.csv=r.csv"])
    with pytest.raises(ValueError, match=r"evaluate.labels: .*\['Edemma'\] unknown"):
        config(labels="[Edemma]")
    with pytest.raises(ValueError, match="keep 'real'"):
        config(arms="[synthetic]")
    with pytest.raises(ValueError, match="extractor_weights: densenet121 needs a local weights file"):
        config(extractor="densenet121")
    with pytest.raises(ValueError, match="set evaluate.labels instead"):
        config(**{"real.observations": "[Edema]"})
    with pytest.raises(ValueError, match="did you mean 'bootstrap_samples'"):
        config(bootstrap_sample=10)
