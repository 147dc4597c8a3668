"""results.csv (every figure as one tidy row) and report.md (the write-up's AUC table, with intervals, then
fidelity, diversity and the memorization audit)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from medsd.config import EvaluateConfig
from medsd.evaluate.arms import REAL, ArmResult
from medsd.evaluate.auc import paired_difference
from medsd.evaluate.inputs import EvaluationInputs
from medsd.evaluate.quality import QualityReport, SetQuality
from medsd.evaluate.synthetic import SyntheticFolder

RESULTS_COLUMNS = ("section", "name", "label", "metric", "value", "ci_low", "ci_high", "note")
MEAN = "mean"


def results_frame(cfg: EvaluateConfig, arms: list[ArmResult], quality: QualityReport) -> pd.DataFrame:
    """One row per figure: utility (AUC per arm and label, mean, difference to real), fidelity, diversity and
    memorization per set. NaN values carry their reason in ``note``."""
    nan = (math.nan, math.nan)
    rows = []
    real = next((arm for arm in arms if arm.plan.name == REAL), None)
    for arm in arms:
        scores, name = arm.scores, arm.plan.name
        for label in scores.aucs:
            note = scores.reasons.get(label, "")
            rows.append(("utility", name, label, "auc", scores.aucs[label], *scores.intervals[label], note))
        rows.append(("utility", name, MEAN, "auc", scores.mean, *scores.mean_interval, _mean_note(arm)))
        if real is not None and arm is not real:
            difference, interval = paired_difference(scores, real.scores, cfg.confidence)
            rows.append(("utility", name, MEAN, "auc_minus_real", difference, *interval, "paired bootstrap"))
        rows.append(("utility", name, "", "images_seen", arm.images_seen, *nan, f"{arm.n_train} training images"))
    for item in quality.sets:
        memorization = item.memorization
        rows += [
            ("fidelity", item.name, "", "frechet_distance", item.frechet_distance, *nan, item.note),
            ("fidelity", item.name, "", "knn_precision", item.precision, *nan, item.note),
            ("fidelity", item.name, "", "knn_recall", item.recall, *nan, item.note),
            ("diversity", item.name, MEAN, "ms_ssim", item.diversity.mean_ms_ssim, *nan, item.diversity.reason),
            *[("diversity", item.name, p, "ms_ssim", v, *nan, "") for p, v in item.diversity.per_prompt.items()],
            ("memorization", item.name, "", "memorized_share", memorization.share, *nan, ""),
            ("memorization", item.name, "", "feature_threshold", memorization.feature_threshold, *nan, ""),
            ("memorization", item.name, "", "pixel_threshold", memorization.pixel_threshold, *nan, ""),
            ("memorization", item.name, "", "flagged", float(is_flagged(item, cfg)), *nan, ""),
        ]
    return pd.DataFrame(rows, columns=list(RESULTS_COLUMNS))


def _mean_note(arm: ArmResult) -> str:
    missing = sorted(arm.scores.reasons)
    return f"over the labels measured; not {missing}" if missing else "over every label"


def is_flagged(item: SetQuality, cfg: EvaluateConfig) -> bool:
    """A synthetic set whose memorized share exceeds ``cfg.memorization_limit`` (the reference is never flagged)."""
    return not item.is_reference and item.memorization.share > cfg.memorization_limit


def flags(cfg: EvaluateConfig, quality: QualityReport) -> list[str]:
    """One warning line per flagged synthetic set."""
    return [
        f"{item.name}: {item.memorization.share:.1%} of its images are near-copies of training images "
        f"(limit {cfg.memorization_limit:.1%})"
        for item in quality.sets
        if is_flagged(item, cfg)
    ]


def cell(value: float, interval: tuple[float, float] | None = None) -> str:
    """'0.912 [0.884, 0.937]', or 'n/a' for NaN."""
    if math.isnan(value):
        return "n/a"
    if interval is None or math.isnan(interval[0]):
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def auc_table(cfg: EvaluateConfig, arms: list[ArmResult]) -> list[str]:
    """The write-up's table in Markdown: an arm per row, a label per column, then the mean and its change vs real."""
    labels = list(cfg.labels)
    real = next((arm for arm in arms if arm.plan.name == REAL), None)
    lines = [
        "| **AUC** | " + " | ".join(f"**{label}**" for label in labels) + " | **Mean** | **Mean - real** |",
        "|---" * (len(labels) + 3) + "|",
    ]
    for arm in arms:
        scores = arm.scores
        cells = [cell(scores.aucs[label], scores.intervals[label]) for label in labels]
        difference = ""
        if real is not None and arm is not real:
            difference = cell(*paired_difference(scores, real.scores, cfg.confidence))
        mean = cell(scores.mean, scores.mean_interval)
        lines.append(f"| {arm.plan.title} | " + " | ".join(cells) + f" | {mean} | {difference} |")
    return lines


def write_report(
    cfg: EvaluateConfig,
    inputs: EvaluationInputs,
    arms: list[ArmResult],
    quality: QualityReport,
    figures: dict[str, Path],
    path: Path,
) -> Path:
    """report.md: what was compared, the AUC table with intervals, NaN reasons, quality table, flags, figures."""
    interval_text = f"{cfg.confidence:.0%} bootstrap intervals over {cfg.bootstrap_samples} test resamples"
    lines = [
        "# medsd evaluation: does the synthetic data help?",
        "",
        *_sets_lines(cfg, inputs),
        "",
        f"## Utility: AUC on held-out real images ({interval_text})",
        "",
        *auc_table(cfg, arms),
        "",
        *_budget_lines(cfg, arms),
        *_nan_lines(arms),
        "",
        *_quality_lines(cfg, quality),
    ]
    lines += ["", "## Figures", ""] + [f"![{name}]({file.name})" for name, file in figures.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sets_lines(cfg: EvaluateConfig, inputs: EvaluationInputs) -> list[str]:
    lines = [
        f"- Real training: {len(inputs.real)} images from `{cfg.real.csv}`; test: {len(inputs.test)} images "
        f"({f'`{cfg.test_csv}`' if cfg.test_csv else f'{cfg.test_fraction:.0%} of real patients held out'}).",
        f"- Labels: {', '.join(cfg.labels)}; uncertainty policy {cfg.real.uncertainty_policy}; "
        f"views {cfg.real.views}; {cfg.real.image_size_px} px.",
    ]
    for folder in inputs.folders:
        made = f" (plan {folder.plan}, model {folder.model_hash[:12]})" if folder.model_hash else " (no manifest)"
        lines.append(f"- Synthetic: {len(folder.images)} images in `{folder.path}`{made}.{curation_note(folder)}")
    scale = "every guidance scale" if cfg.guidance_scale is None else f"guidance {cfg.guidance_scale:g}"
    lines.append(f"- The arms' synthetic set: {len(inputs.synthetic)} images of folder 0 ({scale}).")
    lines += [f"- Skipped while reading {s.name}: {s.skipped}" for s in (inputs.real, inputs.test) if s.skipped]
    return lines


def curation_note(folder: SyntheticFolder) -> str:
    """Curated sets say so: a real-trained judge chose their images, so no arm on them is free of real data."""
    if not folder.curation:
        return ""
    curation = folder.curation
    trained_on = curation.get("judge", {}).get("trained_on") or curation.get("judge", {}).get("file")
    return (
        f" Curated by `medsd curate`: a judge trained on `{trained_on}` kept {curation.get('kept')} of "
        f"{curation.get('source_images')} images of `{curation.get('source')}` (threshold "
        f"{curation.get('threshold')}), so even its synthetic-only arm learned from what real images taught the judge."
    )


def _budget_lines(cfg: EvaluateConfig, arms: list[ArmResult]) -> list[str]:
    start = f"weights from `{cfg.weights_path}`" if cfg.weights_path else "random initialisation"
    seen = ", ".join(f"{arm.plan.name} {arm.images_seen}" for arm in arms)
    line = (
        f"Classifier: {cfg.architecture}, {start}, seed {cfg.seed}, batch {cfg.batch_size}, learning rate "
        f"{cfg.learning_rate:g}; the same budget per arm (epochs={cfg.epochs} over the real images, the last pass cut "
        f"short), images seen: {seen}."
    )
    if cfg.equal_size:
        line += " Synthetic sets subsampled to the real count."
    if cfg.real_max_images is not None:
        line += f" Real training images: a seeded subsample of at most {cfg.real_max_images} (real_max_images)."
    return [line]


def _nan_lines(arms: list[ArmResult]) -> list[str]:
    notes = [
        f"- {arm.plan.title}, {label}: n/a because {why}" for arm in arms for label, why in arm.scores.reasons.items()
    ]
    return ["", "Not measured:", *notes] if notes else []


def _quality_lines(cfg: EvaluateConfig, quality: QualityReport) -> list[str]:
    lines = [
        f"## Fidelity, diversity, memorization (features: {quality.extractor}, {quality.feature_dims}-d)",
        "",
        "| set | images | Frechet distance | k-NN precision | k-NN recall | MS-SSIM within prompt | memorized |",
        "|---|---|---|---|---|---|---|",
    ]
    for item in quality.sets:
        title = f"{item.name} (real reference)" if item.is_reference else item.name
        lines.append(
            f"| {title} | {item.n_images} | {cell(item.frechet_distance)} | {cell(item.precision)} | "
            f"{cell(item.recall)} | {cell(item.diversity.mean_ms_ssim)} | {item.memorization.share:.1%} |"
        )
    audit = quality.sets[0].memorization
    calibration = (
        "thresholds set in the config"
        if cfg.memorization_feature_threshold is not None and cfg.memorization_pixel_threshold is not None
        else "unset thresholds: the highest any held-out real image reaches"
    )
    lines += [
        "",
        f"Memorized: the nearest real training image has feature cosine >= {audit.feature_threshold:.4f} and pixel "
        f"correlation >= {audit.pixel_threshold:.4f} ({calibration}). Lower MS-SSIM is more diverse.",
    ]
    lines += [f"- {item.name}: {item.note}" for item in quality.sets if item.note]
    warnings = flags(cfg, quality)
    lines += ["", *[f"**WARNING: memorization** {warning}" for warning in warnings]] if warnings else []
    return lines
