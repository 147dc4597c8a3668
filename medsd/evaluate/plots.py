"""The evaluation's figures: per-label AUC bars, AUC vs guidance scale, and image grids (label x samples,
sets compared side by side, memorization pairs). Plots use matplotlib's object API (no pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medsd.evaluate.arms import ArmResult
from medsd.evaluate.images import GUIDANCE_SCALE, ImageSet
from medsd.evaluate.quality import SetQuality
from medsd.figures import save_image_grid
from medsd.labels import NO_FINDING

CHANCE_AUC = 0.5


def plot_auc_bars(arms: list[ArmResult], labels: tuple[str, ...], path: Path) -> Path:
    """Grouped bars: one group per label (and the mean), one bar per arm, bootstrap intervals as error bars."""
    groups = [*labels, "Mean"]
    figure = Figure(figsize=(max(6.0, 1.6 * len(groups)), 4.0), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(arms)
    for number, arm in enumerate(arms):
        scores = arm.scores
        values = [scores.aucs[label] for label in labels] + [scores.mean]
        intervals = [scores.intervals[label] for label in labels] + [scores.mean_interval]
        errors = np.array([[v - low, high - v] for v, (low, high) in zip(values, intervals, strict=True)]).T
        positions = np.arange(len(groups)) + (number - (len(arms) - 1) / 2) * width
        heights = np.nan_to_num(values, nan=0.0)
        axes.bar(positions, heights, width, yerr=np.nan_to_num(errors), capsize=2, label=arm.plan.title)
        for position, value in zip(positions, values, strict=True):
            if math.isnan(value):  # say so on the chart rather than draw a bar of 0
                axes.text(position, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    axes.axhline(CHANCE_AUC, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xticks(np.arange(len(groups)), groups, rotation=20, ha="right")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("AUC on held-out real images")
    axes.legend(fontsize=7, loc="lower right")
    return _save(figure, path)


def plot_auc_vs_guidance(
    sweep: list[ArmResult], variants: list[ImageSet], real: ArmResult | None, path: Path
) -> Path | None:
    """Synthetic-only mean AUC (with intervals) against guidance scale, one line per synthetic folder, and the
    real-only mean as a dashed line. Sets of unknown guidance (not made by medsd) are left out; None when no
    set has a known scale."""
    scale_of = {v.name: float(v.frame[GUIDANCE_SCALE].iloc[0]) for v in variants}
    lines: dict[str, list[tuple[float, ArmResult]]] = {}
    for arm in sweep:
        scale = scale_of.get(arm.plan.variant, math.nan)
        if not math.isnan(scale):
            folder = arm.plan.variant.rpartition(" ")[0] or "synthetic"  # "0:ckpt-500 g4" -> "0:ckpt-500"
            lines.setdefault(folder, []).append((scale, arm))
    if not lines:
        return None
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.subplots()
    for folder, points in lines.items():
        points.sort(key=lambda point: point[0])
        means = np.array([arm.scores.mean for _, arm in points])
        intervals = np.array([arm.scores.mean_interval for _, arm in points])  # (P, 2)
        errors = np.nan_to_num(np.abs(intervals.T - means))
        axes.errorbar([scale for scale, _ in points], means, yerr=errors, marker="o", capsize=3, label=folder)
    if real is not None:
        axes.axhline(real.scores.mean, color="black", linestyle="--", linewidth=1.0, label="real only")
    axes.set_xlabel("guidance scale")
    axes.set_ylabel("mean AUC, synthetic-only classifier")
    axes.legend(fontsize=8)
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def label_rows(images: ImageSet) -> dict[str, np.ndarray]:
    """Row title -> indices of images positive for that label (labels in order), then No Finding: none positive."""
    positive = (images.targets == 1) & (images.mask > 0)
    rows = {label: np.flatnonzero(positive[:, i]) for i, label in enumerate(images.labels)}
    rows[NO_FINDING] = np.flatnonzero(~positive.any(axis=1))
    return {title: index for title, index in rows.items() if len(index)}


def save_samples_grid(images: ImageSet, per_row: int, path: Path) -> Path:
    """A label x samples grid of the first ``per_row`` images of each label (blank cells where a label has fewer)."""
    rows = label_rows(images)
    grid = np.full((len(rows), per_row, *images.images.shape[1:]), 255, dtype=np.uint8)
    for row, index in enumerate(rows.values()):
        chosen = index[:per_row]
        grid[row, : len(chosen)] = images.images[chosen]
    return save_image_grid(grid, list(rows), path)


def save_comparison_grid(variants: list[ImageSet], path: Path) -> Path:
    """Rows: labels; columns: sets (checkpoints, guidance scales); each cell the set's first image of the label."""
    rows = list(dict.fromkeys(title for variant in variants for title in label_rows(variant)))
    side = variants[0].images.shape[1:]
    grid = np.full((len(rows), len(variants), *side), 255, dtype=np.uint8)
    for column, variant in enumerate(variants):
        found = label_rows(variant)
        for row, title in enumerate(rows):
            if title in found:
                grid[row, column] = variant.images[found[title][0]]
    return save_image_grid(grid, rows, path, column_titles=[v.name for v in variants])


def save_memorization_pairs(
    sets: list[SetQuality], variants: list[ImageSet], real: ImageSet, n_pairs: int, path: Path
) -> Path:
    """The ``n_pairs`` most similar (synthetic, nearest training image by pixels) pairs over every synthetic set,
    side by side, titled with the set, the pixel correlation and the feature cosine (* = memorized)."""
    candidates = []
    for quality, variant in zip([s for s in sets if not s.is_reference], variants, strict=True):
        audit = quality.memorization
        for synthetic, training in audit.top_pairs(n_pairs):
            candidates.append((audit.nearest.pixel_similarity[synthetic], variant, synthetic, training, audit))
    chosen = sorted(candidates, key=lambda candidate: -candidate[0])[:n_pairs]
    grid = np.stack([np.stack([v.images[s], real.images[t]]) for _, v, s, t, _ in chosen])  # (n, 2, S, S)
    titles = [
        f"{'*' if a.memorized[s] else ''}{v.name} px {p:.3f} ft {a.nearest.feature_similarity[s]:.3f}"
        for p, v, s, _, a in chosen
    ]
    return save_image_grid(grid, titles, path, column_titles=["synthetic", "nearest real"])
