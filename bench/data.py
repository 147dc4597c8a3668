"""Benchmark medsd.data: CSV read+validate vs plain pandas, and Ray image decoding vs a plain PIL loop.

Prints one JSON line. Ratios are measured in one run on the same files:
- csv_read_ratio = medsd seconds / pandas seconds (goal <= 2.0), best of ``--repeats``;
- decode_ratio = Ray images/s / PIL-loop images/s (> 1 means the Ray path is faster).

    PYTHONPATH=. python bench/data.py [--rows 223414] [--images 1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from PIL import Image

from medsd.config import DataConfig
from medsd.data import load_dataset, load_image, read_labels_csv
from medsd.labels import CHEXPERT_METADATA_COLUMNS, CHEXPERT_OBSERVATIONS

CHEXPERT_TRAIN_ROWS = 223_414
# Approximate (positive, negative, uncertain) counts per observation in CheXpert-v1.0-small train.csv;
# the rest is blank. Only the shape of the data matters here: mostly blanks, some -1.0.
LABEL_COUNTS = {
    "No Finding": (22_381, 0, 0),
    "Enlarged Cardiomediastinum": (10_798, 21_638, 12_403),
    "Cardiomegaly": (27_000, 11_116, 8_087),
    "Lung Opacity": (105_581, 6_599, 5_598),
    "Lung Lesion": (9_186, 1_270, 1_488),
    "Edema": (52_246, 20_726, 12_984),
    "Consolidation": (14_783, 28_097, 27_742),
    "Pneumonia": (6_039, 2_799, 18_770),
    "Atelectasis": (33_376, 1_328, 33_739),
    "Pneumothorax": (19_448, 56_341, 3_145),
    "Pleural Effusion": (86_187, 35_396, 11_628),
    "Pleural Other": (3_523, 316, 2_653),
    "Fracture": (9_040, 2_512, 642),
    "Support Devices": (116_001, 6_137, 1_079),
}


def synthesize_chexpert_csv(path: Path, n_rows: int, seed: int = 0) -> None:
    """Write a CheXpert-format train.csv of ``n_rows`` with roughly CheXpert's value distribution."""
    rng = np.random.default_rng(seed)
    frontal = rng.random(n_rows) < 191_027 / CHEXPERT_TRAIN_ROWS
    patient = np.sort(rng.integers(1, 64_541, n_rows))
    study = rng.integers(1, 8, n_rows)
    view = np.where(frontal, 1, 2)
    paths = (
        pd.Series(patient).map("CheXpert-v1.0-small/train/patient{:05d}".format)
        + pd.Series(study).map("/study{}".format)
        + pd.Series(view).map("/view{}".format)
        + np.where(frontal, "_frontal.jpg", "_lateral.jpg")
    )
    projection = rng.choice(["AP", "PA", "LL", "RL"], n_rows, p=[0.846, 0.15393, 0.00005, 0.00002])
    frame = pd.DataFrame(
        {
            "Path": paths,
            "Sex": rng.choice(["Male", "Female"], n_rows, p=[0.593, 0.407]),
            "Age": np.clip(rng.normal(60.4, 17.8, n_rows).round(), 0, 90).astype(int),
            "Frontal/Lateral": np.where(frontal, "Frontal", "Lateral"),
            "AP/PA": np.where(frontal, projection, None),
        }
    )
    for observation in CHEXPERT_OBSERVATIONS:
        positive, negative, uncertain = (c / CHEXPERT_TRAIN_ROWS for c in LABEL_COUNTS[observation])
        blank = 1 - positive - negative - uncertain
        frame[observation] = rng.choice([1.0, 0.0, -1.0, np.nan], n_rows, p=[positive, negative, uncertain, blank])
    frame[list(CHEXPERT_METADATA_COLUMNS + CHEXPERT_OBSERVATIONS)].to_csv(path, index=False)


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each, interleaved so that load from other work hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}


def bench_csv(folder: Path, n_rows: int, repeats: int) -> dict[str, float]:
    csv_path = folder / "train.csv"
    synthesize_chexpert_csv(csv_path, n_rows)
    cfg = DataConfig(csv=str(csv_path))
    seconds = best_seconds(
        {
            "medsd": lambda: read_labels_csv(csv_path),
            "load_dataset": lambda: load_dataset(cfg, check_files=False),
            "pandas": lambda: pd.read_csv(csv_path),
        },
        repeats,
    )
    return {
        "csv_rows": n_rows,
        "csv_read_medsd_s": round(seconds["medsd"], 3),
        "csv_load_dataset_s": round(seconds["load_dataset"], 3),
        "csv_read_pandas_s": round(seconds["pandas"], 3),
        "csv_read_ratio": round(seconds["medsd"] / seconds["pandas"], 2),
        "csv_load_dataset_ratio": round(seconds["load_dataset"] / seconds["pandas"], 2),
    }


def write_image_dataset(folder: Path, n_images: int, side_px: int, seed: int = 0) -> Path:
    """Half PNG, half JPEG grayscale radiograph-like images at ``side_px``, and a CheXpert CSV naming them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side_px, 0:side_px] / side_px
    body = 200 * np.exp(-(((xx - 0.5) / 0.3) ** 2 + ((yy - 0.55) / 0.4) ** 2))
    rows = []
    for i in range(n_images):
        pixels = np.clip(body + rng.normal(0, 12, body.shape), 0, 255).astype(np.uint8)
        relative = f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.{'png' if i % 2 else 'jpg'}"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / relative, quality=90)
        rows.append({"Path": relative, "Sex": "Female", "Age": 50, "Frontal/Lateral": "Frontal", "AP/PA": "AP"})
    frame = pd.DataFrame(rows)
    for observation in CHEXPERT_OBSERVATIONS:
        frame[observation] = rng.choice([1.0, 0.0, -1.0, np.nan], n_images)
    csv_path = folder / "CheXpert-v1.0-small" / "train.csv"
    frame.to_csv(csv_path, index=False)
    return csv_path


def bench_decode(folder: Path, n_images: int, side_px: int, image_size_px: int) -> dict[str, float]:
    csv_path = write_image_dataset(folder, n_images, side_px)
    images = load_dataset(DataConfig(csv=str(csv_path), image_size_px=image_size_px))
    files = images.frame["image_path"].tolist()

    def pil_loop() -> None:
        for file in files:
            with Image.open(file) as image:
                np.asarray(image.convert("L").resize((image_size_px, image_size_px), Image.Resampling.BILINEAR))

    def medsd_loop() -> None:  # the same decoder as the Ray path, in one process: separates decoder from Ray
        for file in files:
            load_image(file, image_size_px, "pad")

    def ray_path() -> None:
        n = sum(len(batch["image"]) for batch in images.to_ray_dataset().iter_batches(batch_size=None))
        if n != n_images:
            raise RuntimeError(f"Ray path decoded {n} images, expected {n_images}")

    ray_cold = best_seconds({"ray": ray_path}, 1)["ray"]  # starts Ray's worker processes
    seconds = best_seconds({"ray": ray_path, "pil": pil_loop, "load_image": medsd_loop}, 2)
    ray_warm, pil, medsd = seconds["ray"], seconds["pil"], seconds["load_image"]
    return {
        "images": n_images,
        "image_side_px": side_px,
        "image_size_px": image_size_px,
        "images_per_s_ray": round(n_images / ray_warm, 1),
        "images_per_s_ray_cold": round(n_images / ray_cold, 1),
        "images_per_s_pil_loop": round(n_images / pil, 1),
        "images_per_s_load_image_loop": round(n_images / medsd, 1),
        "decode_ratio": round(pil / ray_warm, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=CHEXPERT_TRAIN_ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-side-px", type=int, default=320)
    parser.add_argument("--image-size-px", type=int, default=64)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medsd-bench-data-") as tmp:
        figures = bench_csv(Path(tmp), args.rows, args.repeats)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            figures |= bench_decode(Path(tmp), args.images, args.image_side_px, args.image_size_px)
        finally:
            ray.shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
