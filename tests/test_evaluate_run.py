"""medsd.evaluate end to end on a real local Ray and the phantom: every arm and metric, the exact output
layout, NaN with reasons, the memorization flag, sweeps over folders and guidance scales, and the real arm's
AUC on the competition five."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from synthetic_folders import write_synthetic_folder

from medsd.config import EvaluateConfig, PhantomConfig, load_config
from medsd.evaluate import run_evaluation
from medsd.labels import COMPETITION_FIVE, PATH_COLUMN
from medsd.phantom import render_phantom_images, write_phantom

SMALL_PHANTOM = PhantomConfig(n_images=500, image_size_px=64, seed=0, valid_fraction=0.3, lateral_fraction=0.0)
# tests/test_classifier.py's learnability recipe (ResNet-18, 2 epochs, batch 16) on 2,200 frontal phantoms
# (with 1,800, Atelectasis stayed at 0.84).
LEARNABILITY_PHANTOM = PhantomConfig(n_images=2200, image_size_px=64, seed=0, valid_fraction=0.2, lateral_fraction=0.0)
LEARNABILITY_AUC = 0.9
OUTPUT_FILES = {
    "results.csv",
    "report.md",
    "config.yaml",
    "auc_per_label.png",
    "samples.png",
    "memorization_pairs.png",
    "comparison.png",
    "auc_vs_guidance.png",
}


pytestmark = pytest.mark.usefixtures("small_local_ray")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """The small phantom, plus valid-no-consolidation.csv: its test split with every Consolidation negative."""
    root = tmp_path_factory.mktemp("evaluate") / "phantom"
    write_phantom(root, SMALL_PHANTOM)
    valid = pd.read_csv(root / "valid.csv")
    valid["Consolidation"] = 0.0
    valid.to_csv(root / "valid-no-consolidation.csv", index=False)
    return root


@pytest.fixture(scope="module")
def synthetic_folders(phantom) -> tuple[Path, Path]:
    """Folder 0: other phantoms at two guidance scales (g2 noisy, g6 clean), with no Edema positive.
    Folder 1: exact copies of 60 real training images (no manifest, no parquet): a memorizing model."""
    images, labels = render_phantom_images(240, 64, seed=1)
    keep = ((labels["Frontal/Lateral"] == "Frontal") & (labels["Edema"] != 1.0)).to_numpy()
    first = write_synthetic_folder(phantom.parent / "synthetic-a", images[keep], labels[keep], {2.0: 60.0, 6.0: 0.0})
    copies = phantom.parent / "synthetic-copies"
    train = pd.read_csv(phantom / "train.csv").head(60)
    for path in train[PATH_COLUMN]:
        (copies / path).parent.mkdir(parents=True, exist_ok=True)
        (copies / path).write_bytes((phantom / path).read_bytes())
    train.to_csv(copies / "train.csv", index=False)
    return first, copies


@pytest.fixture(scope="module")
def evaluation(phantom, synthetic_folders):
    out = phantom.parent / "out"
    overrides = [
        f"real.csv={phantom / 'train.csv'}",
        "real.views=[Frontal]",
        f"test_csv={phantom / 'valid-no-consolidation.csv'}",
        f"synthetic={[str(folder) for folder in synthetic_folders]}",
        f"out={out}",
        "epochs=1",
        "bootstrap_samples=100",
        "memorization_top_pairs=4",
    ]
    cfg = load_config(EvaluateConfig, None, overrides)
    return cfg, run_evaluation(cfg)


def test_all_arms_and_metrics_run_through_ray_and_write_the_outputs(evaluation):
    cfg, result = evaluation
    assert {path.name for path in result.out.iterdir()} == OUTPUT_FILES
    for name in OUTPUT_FILES - {"results.csv", "report.md", "config.yaml"}:
        with Image.open(result.out / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 100
    assert load_config(EvaluateConfig, result.out / "config.yaml") == cfg

    names = [arm.plan.name for arm in result.arms]
    sweep = ["synthetic:0:synthetic-a g2", "synthetic:0:synthetic-a g6", "synthetic:1:synthetic-copies"]
    assert names == ["real", "synthetic", "mixed", "pretrain_finetune", *sweep]
    real = result.arm("real")
    assert real.images_seen == real.n_train
    for arm in result.arms:  # the same budget, to the image
        assert arm.images_seen == real.images_seen, arm.plan.name
    assert real.scores.mean > 0.75  # a small phantom and one epoch; the 0.9 bar is the learnability test's


def test_results_csv_holds_every_auc_with_intervals_and_explicit_nans(evaluation):
    _, result = evaluation
    results = pd.read_csv(result.out / "results.csv", keep_default_na=False, na_values=[""])
    auc = results[(results["section"] == "utility") & (results["metric"] == "auc")]
    assert len(auc) == len(result.arms) * (len(COMPETITION_FIVE) + 1)  # every label and the mean, per arm
    measured = auc[auc["value"].notna()]
    assert (measured["ci_low"] <= measured["value"]).all() and (measured["value"] <= measured["ci_high"]).all()

    # The test split has no Consolidation positive: NaN for every arm, with the reason, never 0.5.
    consolidation = auc[auc["label"] == "Consolidation"]
    assert consolidation["value"].isna().all()
    assert consolidation["note"].str.contains("the test split has 0 positive").all()
    # Folder 0 holds no Edema positive: its synthetic-only arms cannot rank Edema; real-trained arms can.
    edema = auc[auc["label"] == "Edema"].set_index("name")
    for name in ("synthetic", "synthetic:0:synthetic-a g2", "synthetic:0:synthetic-a g6"):
        assert math.isnan(edema.loc[name, "value"]) and "0 positive" in edema.loc[name, "note"]
    assert edema.loc[["real", "mixed", "pretrain_finetune"], "value"].gt(0.8).all()
    mean = auc[auc["label"] == "mean"].set_index("name")
    assert mean.loc["real", "value"] == pytest.approx(result.arm("real").scores.mean)
    assert "Consolidation" in mean.loc["real", "note"]
    differences = results[results["metric"] == "auc_minus_real"]
    assert set(differences["name"]) == set(auc["name"]) - {"real"}


def test_fidelity_diversity_and_memorization_separate_good_noisy_and_copied_sets(evaluation):
    cfg, result = evaluation
    quality = {item.name: item for item in result.quality.sets}
    reference, clean, noisy, copies = (
        quality["test"], quality["0:synthetic-a g6"], quality["0:synthetic-a g2"], quality["1:synthetic-copies"]
    )  # fmt: skip
    assert reference.is_reference and list(quality)[0] == "test"
    # New phantoms look like the held-out real ones; noise moves them away; copies sit on the training set.
    assert clean.frechet_distance < noisy.frechet_distance and clean.precision > noisy.precision + 0.5
    assert copies.precision == 1.0 and copies.memorization.share == 1.0
    assert clean.memorization.share <= cfg.memorization_limit and noisy.memorization.share == 0.0
    assert not math.isnan(clean.diversity.mean_ms_ssim) and clean.diversity.per_prompt
    assert len(result.flags) == 1 and result.flags[0].startswith("1:synthetic-copies: 100.0% of its images")

    report = (result.out / "report.md").read_text()
    header = "| **AUC** | **Atelectasis** | **Cardiomegaly** | **Consolidation** | **Edema** | **Pleural Effusion** |"
    assert header in report
    for arm in result.arms:
        assert f"| {arm.plan.title} | " in report
    assert "WARNING: memorization** 1:synthetic-copies" in report
    assert "- Real images, Consolidation: n/a because the test split has 0 positive" in report
    results = pd.read_csv(result.out / "results.csv", keep_default_na=False, na_values=[""])
    flagged = results[results["metric"] == "flagged"].set_index("name")["value"]
    assert flagged.to_dict() == {
        "test": 0.0,
        "0:synthetic-a g2": 0.0,
        "0:synthetic-a g6": 0.0,
        "1:synthetic-copies": 1.0,
    }


def test_the_real_arm_learns_the_competition_five(tmp_path, synthetic_folders):
    write_phantom(tmp_path / "phantom", LEARNABILITY_PHANTOM)
    overrides = [
        f"real.csv={tmp_path / 'phantom' / 'train.csv'}",
        f"test_csv={tmp_path / 'phantom' / 'valid.csv'}",
        f"synthetic=[{synthetic_folders[0]}]",
        f"out={tmp_path / 'out'}",
        "arms=[real]",
        "sweep=false",
        "epochs=2",
        "batch_size=16",
        "learning_rate=1e-3",
        "bootstrap_samples=0",
        "cpus_per_arm=2",
    ]
    result = run_evaluation(load_config(EvaluateConfig, None, overrides))
    aucs = result.arm("real").scores.aucs
    print("real arm AUC:", {label: round(value, 3) for label, value in aucs.items()})
    assert all(aucs[label] >= LEARNABILITY_AUC for label in COMPETITION_FIVE), aucs


def test_scarce_real_labels_train_every_arm_on_the_subsample_budget(tmp_path, phantom, synthetic_folders):
    overrides = [
        f"real.csv={phantom / 'train.csv'}",
        "real.views=[Frontal]",
        f"test_csv={phantom / 'valid.csv'}",
        f"synthetic=[{synthetic_folders[0]}]",
        "guidance_scale=6.0",
        f"out={tmp_path / 'out'}",
        "real_max_images=40",
        "epochs=2",
        "arms=[real,mixed]",
        "bootstrap_samples=0",
        "cpus_per_arm=2",
    ]
    result = run_evaluation(load_config(EvaluateConfig, None, overrides))
    real, mixed = result.arm("real"), result.arm("mixed")
    at_guidance_6 = len(pd.read_csv(synthetic_folders[0] / "train.csv")) // 2  # the folder's two scales
    assert real.n_train == 40 and mixed.n_train == 40 + at_guidance_6
    assert real.images_seen == mixed.images_seen == 80
    assert "a seeded subsample of at most 40 (real_max_images)" in (result.out / "report.md").read_text()
