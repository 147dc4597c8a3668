"""`medsd demo`: every stage of medsd on the embedded defaults, on a local Ray.

Stages so far: phantom dataset -> tiny model -> sample grid. Each stage reuses what a previous run
finished (the phantom folder and the cached model), so a rerun is quick.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from medsd.config import DemoConfig, ModelConfig
from medsd.figures import save_image_grid
from medsd.labels import COMPETITION_FIVE, NO_FINDING
from medsd.phantom import PhantomSummary, write_phantom
from medsd.prompts import PromptParts, format_prompt
from medsd.ray_session import ensure_ray

log = logging.getLogger(__name__)

GRID_LABELS = (*COMPETITION_FIVE, NO_FINDING)
GRID_COLUMNS = 4


@dataclass(frozen=True)
class DemoResult:
    out: Path
    phantom: PhantomSummary
    model_dir: Path
    grid_path: Path


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the demo stages in order into ``cfg.out``; returns where each result is."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()

    log.info("[1/3] phantom dataset -> %s", out / "phantom")
    phantom = write_phantom(out / "phantom", cfg.phantom)

    log.info("[2/3] tiny model + [3/3] sample grid (in a Ray task)")
    started = time.perf_counter()
    prompts, seeds = grid_prompts_and_seeds(cfg.grid_seed)
    model_dir, images = ray.get(
        _render_samples.remote(cfg.model.model_dump(mode="json"), prompts, seeds, cfg.grid_steps, cfg.guidance_scale)
    )
    grid = images.reshape(len(GRID_LABELS), GRID_COLUMNS, *images.shape[1:])
    grid_path = save_image_grid(
        grid,
        GRID_LABELS,
        out / "samples" / "grid.png",
        column_titles=[f"seed {s}" for s in seeds[:GRID_COLUMNS]],
    )
    log.info("sample grid of %d images in %.1f s -> %s", len(images), time.perf_counter() - started, grid_path)
    return DemoResult(out=out, phantom=phantom, model_dir=Path(model_dir), grid_path=grid_path)


def grid_prompts_and_seeds(first_seed: int) -> tuple[list[str], list[int]]:
    """One row per label, one seed per column; the same seeds in every row so rows compare."""
    prompts, seeds = [], []
    for label in GRID_LABELS:
        findings = () if label == NO_FINDING else (label,)
        for column in range(GRID_COLUMNS):
            prompts.append(format_prompt(PromptParts(findings, view="Frontal", projection="PA")))
            seeds.append(first_seed + column)
    return prompts, seeds


@ray.remote(num_cpus=2)
def _render_samples(model_config: dict, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float):
    # Imported here: the worker, not the driver, loads torch and the model.
    from medsd.models import load_pipeline, resolve_model_dir
    from medsd.sampling import sample_images

    model_cfg = ModelConfig.model_validate(model_config)
    pipe = load_pipeline(model_cfg)
    images = sample_images(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    return resolve_model_dir(model_cfg.model, model_cfg.cache_dir), images
