"""What a training run shows of itself: sample grids (fixed prompts and seeds), the loss curve, metrics CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsd.config import ValidationConfig
from medsd.figures import save_image_grid
from medsd.sampling import sample_images

METRICS_COLUMNS = ("step", "epoch", "loss", "learning_rate", "samples_per_second", "seconds", "sample_ids")
SMOOTHING_WINDOW = 25  # steps in the moving average drawn over the raw loss


def render_grid(
    pipe,
    rows: Sequence[tuple[str, str]],
    settings: ValidationConfig,
    out_path: Path,
    autocast: torch.dtype | None,
) -> Path:
    """One grid row per (title, prompt), one column per seed (the same seeds in every row, so rows compare)."""
    seeds = [settings.seed + column for column in range(settings.images_per_label)]
    prompts = [prompt for _title, prompt in rows for _seed in seeds]
    device_type = pipe.device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        images = sample_images(
            pipe, prompts, seeds * len(rows), steps=settings.steps, guidance_scale=settings.guidance_scale
        )  # (rows * columns, H, W)
    grid = images.reshape(len(rows), len(seeds), *images.shape[1:])
    return save_image_grid(grid, [title for title, _ in rows], out_path, column_titles=[f"seed {s}" for s in seeds])


def write_metrics_csv(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """One row per optimizer step (columns METRICS_COLUMNS; sample_ids blank unless recorded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({column: row.get(column, "") for column in METRICS_COLUMNS})
    return path


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot_loss_curve(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Raw per-step loss and its moving average against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    steps = np.array([row["step"] for row in history])
    losses = np.array([row["loss"] for row in history], dtype=np.float64)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, losses, color="0.75", linewidth=0.8, label="loss")
    if len(losses) >= SMOOTHING_WINDOW:
        kernel = np.ones(SMOOTHING_WINDOW) / SMOOTHING_WINDOW
        axes.plot(
            steps[SMOOTHING_WINDOW - 1 :],
            np.convolve(losses, kernel, mode="valid"),
            color="C0",
            label=f"mean of {SMOOTHING_WINDOW} steps",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("denoising loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
