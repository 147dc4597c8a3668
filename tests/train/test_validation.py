"""medsd.train.validation: grids of fixed prompts and seeds, metrics CSV, loss curve."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medsd.config import ModelConfig, ValidationConfig
from medsd.models import load_pipeline
from medsd.train.validation import METRICS_COLUMNS, plot_loss_curve, read_metrics_csv, render_grid, write_metrics_csv

HISTORY = [
    {"step": s, "epoch": 0, "loss": 1.0 / s, "learning_rate": 1e-4, "samples_per_second": 10.0, "seconds": s}
    for s in range(1, 31)
]


def test_grid_has_one_row_per_prompt_and_is_reproducible(tiny_model_dir, tmp_path) -> None:
    pipe = load_pipeline(ModelConfig(model=str(tiny_model_dir)), sampler="dpm++")
    rows = [("Edema", "a chest x-ray showing edema"), ("No Finding", "a chest x-ray with no finding")]
    settings = ValidationConfig(images_per_label=3, steps=2)
    first = np.asarray(Image.open(render_grid(pipe, rows, settings, tmp_path / "a.png", None)))
    second = np.asarray(Image.open(render_grid(pipe, rows, settings, tmp_path / "b.png", None)))
    np.testing.assert_array_equal(first, second)
    one_row = np.asarray(Image.open(render_grid(pipe, rows[:1], settings, tmp_path / "c.png", None)))
    assert first.shape[0] > one_row.shape[0] and first.shape[1] == one_row.shape[1]


def test_metrics_csv_and_loss_curve(tmp_path) -> None:
    history = [dict(row, sample_ids="1 2") if row["step"] == 1 else row for row in HISTORY]
    rows = read_metrics_csv(write_metrics_csv(history, tmp_path / "metrics.csv"))
    assert list(rows[0]) == list(METRICS_COLUMNS)
    assert [r["sample_ids"] for r in rows[:2]] == ["1 2", ""]
    assert float(rows[9]["loss"]) == 0.1
    png = plot_loss_curve(HISTORY, tmp_path / "loss.png", "test")
    assert Image.open(png).size == (700, 400)
