"""Prompts + seeds -> grayscale radiographs, one torch.Generator per image.

Every sampler path (demo grid, bulk generation, serving, validation grids) goes through
:func:`sample_images`, so an image depends only on its prompt, seed and settings, never on the
batch it landed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    negative_prompt: str | None = None,
) -> np.ndarray:
    """Run ``pipe`` once for the batch; return (N, H, W) uint8 grayscale images.

    Generators live on the CPU so that a seed gives the same starting noise on every device.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; expected one seed per prompt")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    with torch.inference_mode():
        result = pipe(
            prompt=list(prompts),
            negative_prompt=negative,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        )
    return to_grayscale_uint8(result.images)


def to_grayscale_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> (N, H, W) uint8; radiographs are one channel stored as three."""
    gray = np.asarray(images, dtype=np.float32).mean(axis=-1)
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
