"""Does the synthetic data help, on the phantom? The utility benchmark end to end: train the tiny model
label-conditionally with the demo budget (configs/train-tiny-phantom.yaml, as is), generate a balanced
per-label set (each competition label and No Finding, `plan: balanced`: prompts taken from the real phantom
rows positive for the label, so co-occurring findings come along) with `medsd generate`, curate it with
`medsd curate` (a classifier trained on the real phantom sets aside the images whose labels it contradicts),
then `medsd evaluate` the set as generated and as curated against classifiers trained on the real phantom,
all tested on the phantom's held-out patients. With --scarce-real-images N, also the curated set where real
labels are scarce: the real, real + synthetic and pre-training arms get N of the real training images, with as
many passes as keep the images seen (the generator and the judge learned from all of them, as a model trained
where labels are plentiful would serve a site where they are not). It adds about 3 minutes at N=50, off by
default to keep the bench under 30.

Why not single-finding prompts per label: the phantom's findings co-occur as CheXpert's do (atelectasis is
never the only finding), and a classifier trained on images that show exactly one finding learns that
effusion means "not atelectasis" (measured with the same model: synthetic-only mean AUC 0.754 single-finding,
0.794 with real label rows).

Goals: synthetic-only mean AUC >= 0.9 x real-only with no label below 0.6, and real + synthetic >= real-only;
checked for the set as generated ("passed") and as curated ("curated_passed"). The curated synthetic-only arm
is not "never saw a real image": its images were chosen by a judge trained on real ones. The scarce-label
figures ("scarce_*") carry no goal: they ask whether synthetic images add what a few real ones lack.
Prints per-label AUC for each arm, then one JSON line.

    python bench/quality.py [--out DIR] [--per-label 100] [--scarce-real-images N]
                            [--set key=value ...  (EvaluateConfig overrides)]

A rerun resumes training and generation and reuses the curation from what the first run left in --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from medsd.config import CurateConfig, EvaluateConfig, GenerateConfig, TrainConfig, load_config
from medsd.curate import run_curation
from medsd.evaluate import run_evaluation
from medsd.evaluate.auc import paired_difference
from medsd.generate import run_generate
from medsd.labels import COMPETITION_FIVE
from medsd.ray_session import ensure_ray
from medsd.train import run_training
from medsd.train.run import PHANTOM_FOLDER

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "train-tiny-phantom.yaml"
GOAL_SYNTHETIC_RATIO, GOAL_MIN_LABEL_AUC = 0.9, 0.6
# DPM-Solver++ 20 steps. Guidance 3: in sweeps of this recipe's synthetic-only AUC (evaluate's AUC-vs-guidance)
# 2, 3 and 4 were within noise of each other (0.864, 0.878, 0.873) and 7 and 10 clearly lower.
GENERATE = ["steps=20", "sampler=dpm++", "guidance_scales=[3.0]", "batch_size=16", "num_actors=1",
            "cpus_per_actor=2", "seed=0"]  # fmt: skip
# Classifiers: three passes over the real frontal phantoms per arm, one arm per core at a time.
EPOCHS = 3
EVALUATE = [f"epochs={EPOCHS}", "batch_size=16", "learning_rate=1e-3", "bootstrap_samples=1000", "cpus_per_arm=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/quality", help="folder for the model, dataset and report")
    parser.add_argument("--per-label", type=int, default=100, help="synthetic images per label (and No Finding)")
    parser.add_argument(
        "--scarce-real-images", type=int, default=0, metavar="N", help="also evaluate with N real images (0: off)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    ensure_ray()
    started = time.perf_counter()

    # 1. The tiny model, trained on the phantom with the demo budget.
    train_cfg = load_config(TrainConfig, TRAIN_CONFIG, [f"out={out / 'train'}"])
    trained = run_training(train_cfg)
    train_seconds = time.perf_counter() - started

    # 2. A balanced set: each competition label and No Finding, prompts from frontal phantom rows positive for it.
    mark = time.perf_counter()
    labels = json.dumps(list(COMPETITION_FIVE))
    phantom = out / "train" / PHANTOM_FOLDER
    generate_cfg = load_config(
        GenerateConfig,
        None,
        [f"out={out / 'synthetic'}", f"model.model={trained.runs[0].model_dir}", "plan=balanced",
         f"source.csv={phantom / 'train.csv'}", "source.views=[Frontal]", f"labels={labels}",
         f"per_label={args.per_label}", *GENERATE],
    )  # fmt: skip
    generated = run_generate(generate_cfg)
    generate_seconds = time.perf_counter() - mark

    # 3. The curation: a judge trained on the real phantom (the evaluation's real split and views) keeps the
    #    synthetic images whose five labels it agrees with.
    mark = time.perf_counter()
    real_data = [
        f"real.csv={phantom / 'train.csv'}",
        "real.views=[Frontal]",
        f"real.image_size_px={train_cfg.data.image_size_px}",
    ]
    curate_cfg = load_config(
        CurateConfig, None, [f"synthetic={out / 'synthetic'}", f"out={out / 'curated'}", f"labels={labels}", *real_data]
    )
    curated = run_curation(curate_cfg)
    curate_seconds = time.perf_counter() - mark

    # 4. The evaluations, as generated and as curated: real phantom train split vs synthetic, tested on the
    #    held-out phantom patients (the same seeds, so the real arm is the same classifier in both).
    #    With --scarce-real-images, the curated set again with a seeded subsample of the real training images.
    results, configs, evaluate_seconds = {}, {}, {}

    def evaluate(name: str, folder: str, variant: list[str]) -> None:
        mark = time.perf_counter()
        evaluate_cfg = load_config(
            EvaluateConfig,
            None,
            [f"out={out / 'evaluate' / name}", f"test_csv={phantom / 'valid.csv'}", *real_data,
             f"synthetic=[{out / folder}]", f"labels={labels}", *EVALUATE, *variant, *args.overrides],
        )  # fmt: skip
        results[name], configs[name] = run_evaluation(evaluate_cfg), evaluate_cfg
        evaluate_seconds[name] = time.perf_counter() - mark
        print(f"{name}:\n{results[name].auc_table_text()}")

    evaluate("synthetic", "synthetic", [])
    evaluate("curated", "curated", [])
    if args.scarce_real_images:
        all_real = results["synthetic"].arm("real").n_train
        evaluate("scarce", "curated", scarce_overrides(args.scarce_real_images, all_real))
    confidence = configs["synthetic"].confidence

    timings = {
        "train_seconds": round(train_seconds, 1),
        "generate_seconds": round(generate_seconds, 1),
        "curate_seconds": round(curate_seconds, 1),
        "evaluate_seconds": round(sum(evaluate_seconds.values()), 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    sizes = {
        "real_images": results["synthetic"].arm("real").n_train,
        "synthetic_images": generated.n_images,
        "curated_images": curated.kept,
        "train_steps": trained.runs[0].steps,
    }
    curated_figures = {f"curated_{key}": value for key, value in goal_figures(results["curated"], confidence).items()}
    curated_figures["curated_auc"] = auc_figures(results["curated"])
    curated_figures["curated_rejected_per_label"] = curated.manifest["curation"]["rejected_per_label"]
    scarce_figures = scarce_labels_figures(results["scarce"], confidence) if "scarce" in results else {}
    print(
        json.dumps(
            {
                "bench": "quality",
                **figures(results["synthetic"], confidence),
                **curated_figures,
                **scarce_figures,
                **sizes,
                **timings,
            }
        )
    )


def auc_figures(result) -> dict:
    """Per arm: AUC per label and the mean, to three decimals."""
    aucs = {arm.plan.name: {**arm.scores.aucs, "mean": arm.scores.mean} for arm in result.arms}
    return {arm: {label: round(value, 3) for label, value in values.items()} for arm, values in aucs.items()}


def goal_figures(result, confidence: float) -> dict:
    """The goals' figures of an EvaluationResult and whether they hold; real + synthetic minus real comes with
    its paired bootstrap interval (the same test resamples for both arms)."""
    real, synthetic, mixed = (result.arm(name).scores for name in ("real", "synthetic", "mixed"))
    ratio = synthetic.mean / real.mean
    lowest = min(synthetic.aucs.values())
    difference, interval = paired_difference(mixed, real, confidence)
    return {
        "synthetic_over_real": round(ratio, 3),
        "synthetic_lowest_label_auc": round(lowest, 3),
        "mixed_minus_real": round(difference, 3),
        "mixed_minus_real_interval": [round(v, 3) for v in interval],
        "passed": {
            "synthetic_over_real": ratio >= GOAL_SYNTHETIC_RATIO,
            "synthetic_lowest_label_auc": lowest >= GOAL_MIN_LABEL_AUC,
            "mixed_minus_real": difference >= 0.0,
        },
    }


def scarce_overrides(real_images: int, all_real_images: int) -> list[str]:
    """Evaluate overrides for ``real_images`` real images: as many passes as keep the images seen."""
    epochs = max(1, round(EPOCHS * all_real_images / real_images))
    return [f"real_max_images={real_images}", f"epochs={epochs}", "arms=[real,mixed,pretrain_finetune]"]


def scarce_labels_figures(result, confidence: float) -> dict:
    """Where real labels are scarce: AUCs, and real + synthetic and pre-training minus real with paired intervals."""
    real = result.arm("real").scores
    found = {"scarce_real_images": result.arm("real").n_train, "scarce_auc": auc_figures(result)}
    for arm in ("mixed", "pretrain_finetune"):
        difference, interval = paired_difference(result.arm(arm).scores, real, confidence)
        found[f"scarce_{arm}_minus_real"] = round(difference, 3)
        found[f"scarce_{arm}_minus_real_interval"] = [round(v, 3) for v in interval]
    return found


def figures(result, confidence: float) -> dict:
    """The JSON figures of an EvaluationResult: AUCs per arm, the goals and whether they hold, set quality."""
    reference, quality = result.quality.sets[0], result.quality.sets[1]
    return {
        "auc": auc_figures(result),
        "mean_auc_interval": {arm.plan.name: [round(v, 3) for v in arm.scores.mean_interval] for arm in result.arms},
        **goal_figures(result, confidence),
        "goals": {
            "synthetic_over_real": GOAL_SYNTHETIC_RATIO,
            "synthetic_lowest_label_auc": GOAL_MIN_LABEL_AUC,
            "mixed_minus_real": 0.0,
        },
        "frechet_distance": {
            "synthetic": round(quality.frechet_distance, 3),
            "held_out_real": round(reference.frechet_distance, 3),
        },
        "knn_precision_recall": [round(quality.precision, 3), round(quality.recall, 3)],
        "ms_ssim_within_prompt": {
            "synthetic": round(quality.diversity.mean_ms_ssim, 3),
            "held_out_real": round(reference.diversity.mean_ms_ssim, 3),
        },
        "memorized_share": round(quality.memorization.share, 4),
        "flags": result.flags,
    }


if __name__ == "__main__":
    main()
