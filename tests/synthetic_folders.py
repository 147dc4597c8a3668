"""A synthetic dataset folder laid out as `medsd generate` writes it, drawn from phantom radiographs in
seconds: the evaluation and curation tests need one without training a model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medsd.labels import CHEXPERT, CHEXPERT_OBSERVATIONS, COMPETITION_FIVE, NO_FINDING, PATH_COLUMN, label_slug
from medsd.prompts import prompt_for_labels


def write_synthetic_folder(out: Path, images: np.ndarray, labels: pd.DataFrame, scales: dict[float, float]) -> Path:
    """A folder laid out as `medsd generate` writes it (images/<label>/<id>.png, train.csv, data/ parquet with
    prompt and guidance_scale) from phantom radiographs; ``scales`` maps each guidance scale to a pixel noise
    level, so one scale can be worse than another."""
    rng = np.random.default_rng(0)
    rows = []
    for scale, noise in scales.items():
        for index, (pixels, (_, row)) in enumerate(zip(images, labels.iterrows(), strict=True)):
            positive = [o for o in COMPETITION_FIVE if row[o] == 1.0]
            label = positive[0] if positive else NO_FINDING
            path = f"images/{label_slug(label)}/{label_slug(label)}-{index:06d}-g{scale:g}.png"
            noisy = np.clip(pixels + rng.normal(0.0, noise, pixels.shape), 0, 255).astype(np.uint8)
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(out / path)
            values = {o: 1.0 if row[o] == 1.0 else math.nan for o in CHEXPERT_OBSERVATIONS}
            view = {"Frontal/Lateral": "Frontal", "AP/PA": row["AP/PA"]}
            prompt = prompt_for_labels({**values, **view})
            rows.append({PATH_COLUMN: path, "Sex": row["Sex"], "Age": row["Age"], **view, **values,
                         "prompt": prompt, "guidance_scale": scale, "label": label_slug(label)})  # fmt: skip
    table = pd.DataFrame(rows)
    table[list(CHEXPERT.columns)].to_csv(out / "train.csv", index=False)
    for label, part in table.groupby("label"):
        (out / "data" / f"label={label}").mkdir(parents=True)
        parquet = pa.Table.from_pandas(part.drop(columns="label"), preserve_index=False)
        pq.write_table(parquet, out / "data" / f"label={label}" / "part-0.parquet")
    return out
