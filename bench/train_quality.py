"""Does the tiny model learn? Train it label-conditionally on the phantom with the demo budget
(configs/train-tiny-phantom.yaml), generate images prompted with each competition label and with No Finding,
and score them with a phantom classifier trained on real phantom radiographs. A label's prompt names what a
report of it alone would: the label, and Lung Opacity for its children when the model's prompts name it.

Prints one JSON line: per-label AUC of "prompted with X" vs "prompted with No Finding" on the classifier's
score for X (goal >= 0.8 for each of the competition five), plus the classifier's AUC on held-out real
phantoms (a sanity check of the judge) and the time spent.

    python bench/train_quality.py [--out DIR] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from medsd.classifier import auc_per_label, predict_probabilities, train_classifier
from medsd.config import ModelConfig, PhantomConfig, TrainConfig, load_config
from medsd.labels import COMPETITION_FIVE, NO_FINDING, PROJECTIONS, UncertaintyPolicy, apply_uncertainty_policy
from medsd.models import load_pipeline
from medsd.phantom import OPACITY_CHILDREN, render_phantom_images
from medsd.prompts import PromptParts, format_prompt
from medsd.ray_session import ensure_ray
from medsd.sampling import sample_images
from medsd.train import run_training
from medsd.train.loop import METRICS_FILE
from medsd.train.validation import read_metrics_csv

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train-tiny-phantom.yaml"
GOAL_AUC = 0.8
IMAGES_PER_LABEL = 64
LUNG_OPACITY = "Lung Opacity"
SAMPLER, SAMPLING_STEPS, GUIDANCE_SCALE = "dpm++", 20, 4.0
GENERATE_BATCH = 32
# The judge: a ResNet-18 on real 64 px frontal phantoms (the recipe tests/test_classifier.py checks at AUC >= 0.9).
JUDGE_PHANTOM = PhantomConfig(n_images=3000, image_size_px=64, seed=101, lateral_fraction=0.0)
JUDGE_HELDOUT = 600
JUDGE_EPOCHS, JUDGE_BATCH, JUDGE_LEARNING_RATE = 2, 16, 1e-3


def train_judge() -> tuple[object, dict[str, float]]:
    """A classifier of the competition five trained on real phantoms, and its AUC on held-out real ones."""
    images, labels = render_phantom_images(JUDGE_PHANTOM.n_images, JUDGE_PHANTOM.image_size_px, JUDGE_PHANTOM.seed)
    frontal = (labels["Frontal/Lateral"] == "Frontal").to_numpy()
    images, labels = images[frontal], labels[frontal].reset_index(drop=True)
    targets, mask = apply_uncertainty_policy(labels[list(COMPETITION_FIVE)].to_numpy(), UncertaintyPolicy.IGNORE)
    train, held = slice(JUDGE_HELDOUT, None), slice(0, JUDGE_HELDOUT)
    judge = train_classifier(
        images[train],
        targets[train],
        mask[train],
        epochs=JUDGE_EPOCHS,
        batch_size=JUDGE_BATCH,
        learning_rate=JUDGE_LEARNING_RATE,
        seed=0,
    )
    real_auc = auc_per_label(targets[held], predict_probabilities(judge, images[held]), mask[held], COMPETITION_FIVE)
    return judge, real_auc


def prompted_findings(label: str, prompt_labels: list[str] | None) -> tuple[str, ...]:
    """What a report of ``label`` alone names. The phantom, like CheXpert's labeller, marks Lung Opacity positive
    with any of its children, so a model whose prompts name Lung Opacity never saw a child without it."""
    if label == NO_FINDING:
        return ()
    names_parent = prompt_labels is None or LUNG_OPACITY in prompt_labels
    return (LUNG_OPACITY, label) if names_parent and label in OPACITY_CHILDREN else (label,)


def generate(model_dir: Path, prompt_labels: list[str] | None) -> dict[str, np.ndarray]:
    """IMAGES_PER_LABEL frontal images per competition label and for No Finding; the same seeds for every label."""
    pipe = load_pipeline(ModelConfig(model=str(model_dir)), sampler=SAMPLER)
    images = {}
    for label in (*COMPETITION_FIVE, NO_FINDING):
        findings = prompted_findings(label, prompt_labels)
        # Half AP, half PA, as the phantom's frontal views are.
        prompts = [
            format_prompt(PromptParts(findings, view="Frontal", projection=PROJECTIONS[i % 2]))
            for i in range(IMAGES_PER_LABEL)
        ]
        batches = [
            sample_images(
                pipe,
                prompts[start : start + GENERATE_BATCH],
                list(range(start, min(start + GENERATE_BATCH, IMAGES_PER_LABEL))),
                steps=SAMPLING_STEPS,
                guidance_scale=GUIDANCE_SCALE,
            )
            for start in range(0, IMAGES_PER_LABEL, GENERATE_BATCH)
        ]
        images[label] = np.concatenate(batches)
    return images


def prompted_auc(judge, images: dict[str, np.ndarray]) -> dict[str, float]:
    """Per label X: AUC of the judge's score for X, images prompted with X (positive) vs No Finding (negative)."""
    scores = {label: predict_probabilities(judge, batch) for label, batch in images.items()}
    aucs = {}
    for column, label in enumerate(COMPETITION_FIVE):
        probabilities = np.concatenate([scores[label][:, column], scores[NO_FINDING][:, column]])
        truth = np.concatenate([np.ones(len(images[label])), np.zeros(len(images[NO_FINDING]))])
        aucs[label] = auc_per_label(truth[:, None], probabilities[:, None], np.ones((len(truth), 1)), [label])[label]
    return aucs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/train-quality", help="training output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(TrainConfig, CONFIG, [f"out={args.out}", *args.overrides])

    ensure_ray()
    started = time.perf_counter()
    result = run_training(cfg)  # a rerun resumes from the final checkpoint and only rewrites the outputs
    wall_seconds = time.perf_counter() - started
    # The loop's own clock, summed over resumed runs, excluding Ray start-up, caching and grids.
    train_seconds = float(read_metrics_csv(result.runs[0].out / METRICS_FILE)[-1]["seconds"])

    started = time.perf_counter()
    images = generate(result.runs[0].model_dir, cfg.labels)
    generate_seconds = time.perf_counter() - started

    started = time.perf_counter()
    judge, real_auc = train_judge()
    aucs = prompted_auc(judge, images)
    judge_seconds = time.perf_counter() - started

    print(
        json.dumps(
            {
                "bench": "train_quality",
                "prompted_vs_no_finding_auc": {k: round(v, 3) for k, v in aucs.items()},
                "goal": GOAL_AUC,
                "passed": all(v >= GOAL_AUC for v in aucs.values()),
                "judge_auc_on_real_phantoms": {k: round(v, 3) for k, v in real_auc.items()},
                "method": cfg.method,
                "steps": result.runs[0].steps,
                "batch_size": cfg.batch_size,
                "final_loss": result.runs[0].final_loss,
                "images_per_label": IMAGES_PER_LABEL,
                "sampler": f"{SAMPLER} {SAMPLING_STEPS} steps, guidance {GUIDANCE_SCALE}",
                "train_loop_seconds": round(train_seconds, 1),
                "train_command_wall_seconds": round(wall_seconds, 1),
                "generate_seconds": round(generate_seconds, 1),
                "judge_seconds": round(judge_seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
