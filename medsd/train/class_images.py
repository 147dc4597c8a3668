"""The generated class set of prior preservation: images the base model draws for the class prompt.

Written as a small CheXpert-style dataset (``class_images.csv`` + ``<label-slug>/<i>.png``) so it loads
through :func:`medsd.data.load_dataset` like any other data. Image i uses seed ``seed + i``; an existing set
made by the same model, prompt and settings is topped up, never redrawn (as the reference scripts do).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from medsd.config import DataConfig, ModelConfig, TrainConfig
from medsd.models import model_hash
from medsd.train.conditioning import CLASS_IMAGES_CSV, class_image_path, class_images_frame, class_prompt

logger = logging.getLogger(__name__)

RECORD_FILE = "class_images.json"
GENERATE_BATCH = 16  # images per pipeline call


def generate_class_images(cfg: TrainConfig, data: DataConfig, label: str, model_dir: Path, folder: Path) -> Path:
    """Make sure ``folder`` holds ``dreambooth.num_class_images`` images of the class prompt; returns its CSV."""
    settings = cfg.dreambooth
    prompt = class_prompt(cfg, label)
    record = {
        "model_hash": model_hash(model_dir),
        "prompt": prompt,
        "steps": settings.class_sampling_steps,
        "guidance_scale": settings.class_guidance_scale,
        "sampler": cfg.validation.sampler,
        "seed": cfg.seed,
        "image_size_px": data.image_size_px,
    }
    record_path = folder / RECORD_FILE
    is_same_recipe = record_path.is_file() and json.loads(record_path.read_text()) == record
    first_missing = _first_missing(folder, label, settings.num_class_images) if is_same_recipe else 0
    needed = list(range(first_missing, settings.num_class_images))
    if needed:
        logger.info("class images: generating %d of %r with the base model", len(needed), prompt)
        folder.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        render = _render_class_images.options(
            num_gpus=cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0, num_cpus=cfg.scaling.cpus_per_worker
        )
        for start in range(0, len(needed), GENERATE_BATCH):
            indices = needed[start : start + GENERATE_BATCH]
            seeds = [cfg.seed + i for i in indices]
            images = ray.get(render.remote(cfg.model.model_dump(mode="json"), prompt, seeds, record))
            for index, image in zip(indices, images, strict=True):
                path = folder / class_image_path(label, index)
                path.parent.mkdir(parents=True, exist_ok=True)
                staging = path.with_name(f".{path.name}.partial")
                Image.fromarray(image).save(staging, format="PNG")
                staging.replace(path)  # a crash never leaves a half-written image under its final name
    csv_path = folder / CLASS_IMAGES_CSV
    class_images_frame(label, data, settings.num_class_images).to_csv(csv_path, index=False)
    return csv_path


def _first_missing(folder: Path, label: str, wanted: int) -> int:
    index = 0
    while index < wanted and (folder / class_image_path(label, index)).is_file():
        index += 1
    return index


@ray.remote
def _render_class_images(model_config: dict, prompt: str, seeds: list[int], record: dict) -> np.ndarray:
    # Imported here: the task, not the driver, loads torch and the model.
    from medsd.models import load_pipeline
    from medsd.sampling import sample_images

    pipe = load_pipeline(ModelConfig.model_validate(model_config), sampler=record["sampler"])
    images = sample_images(
        pipe, [prompt] * len(seeds), seeds, steps=record["steps"], guidance_scale=record["guidance_scale"]
    )  # (N, H, W) uint8
    side = record["image_size_px"]
    if images.shape[1] == side:
        return images
    return np.stack([np.asarray(Image.fromarray(i).resize((side, side), Image.Resampling.BICUBIC)) for i in images])
