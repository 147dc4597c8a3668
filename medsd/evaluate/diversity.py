"""Diversity: MS-SSIM (Wang, Simoncelli & Bovik 2003) between images of the same prompt; lower is more diverse.
RoentGen compares 4 images per prompt this way."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# The paper's five scale weights, window and constants, for 8-bit images.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW_PX, WINDOW_SIGMA = 11, 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0


def ms_ssim_scales(side_px: int) -> int:
    """Scales that fit an image: each halves the side, and the window must still fit (64 px -> 3, 256 px -> 5)."""
    if side_px < WINDOW_PX:
        raise ValueError(f"ms_ssim: images of {side_px} px are smaller than the {WINDOW_PX} px window")
    return min(len(MS_SSIM_WEIGHTS), 1 + int(math.log2(side_px / WINDOW_PX)))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MS-SSIM of each pair ``a[i]``, ``b[i]`` (N, H, W) uint8 -> (N,) float64 in [0, 1], 1 for identical images.

    Images too small for five scales use the first scales that fit, their weights renormalised to sum to 1.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ms_ssim: got shapes {a.shape} and {b.shape}; expected the same (N, H, W)")
    x = torch.as_tensor(a).double().unsqueeze(1)  # (N, 1, H, W)
    y = torch.as_tensor(b).double().unsqueeze(1)
    scales = ms_ssim_scales(min(a.shape[1:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    window = _gaussian_window()
    factors = []
    for scale in range(scales):
        luminance, contrast_structure = _ssim_maps(x, y, window)
        if scale < scales - 1:
            factors.append(contrast_structure.mean(dim=(1, 2, 3)).clamp(min=0.0))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:  # luminance only at the coarsest scale
            factors.append((luminance * contrast_structure).mean(dim=(1, 2, 3)).clamp(min=0.0))
    return torch.stack(factors, dim=1).pow(weights).prod(dim=1).numpy()


def _gaussian_window() -> torch.Tensor:
    offsets = torch.arange(WINDOW_PX, dtype=torch.float64) - WINDOW_PX // 2
    window = torch.exp(-(offsets**2) / (2 * WINDOW_SIGMA**2))
    return window / window.sum()  # (W,), applied along rows then columns


def _ssim_maps(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Luminance and contrast-structure maps over valid window positions, each (N, 1, H-10, W-10)."""

    def blur(image: torch.Tensor) -> torch.Tensor:
        rows = F.conv2d(image, window.view(1, 1, -1, 1))
        return F.conv2d(rows, window.view(1, 1, 1, -1))

    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    mean_x, mean_y = blur(x), blur(y)
    var_x = blur(x * x) - mean_x**2
    var_y = blur(y * y) - mean_y**2
    covariance = blur(x * y) - mean_x * mean_y
    luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
    contrast_structure = (2 * covariance + c2) / (var_x + var_y + c2)
    return luminance, contrast_structure


@dataclass(frozen=True)
class Diversity:
    """Mean pairwise MS-SSIM within prompts (and per prompt); NaN with ``reason`` when no prompt has 2 images."""

    mean_ms_ssim: float
    per_prompt: dict[str, float] = field(default_factory=dict)
    reason: str = ""


def prompt_diversity(images: np.ndarray, prompts: list[str], per_prompt: int, max_prompts: int) -> Diversity:
    """MS-SSIM over every pair of the first ``per_prompt`` images of each of the first ``max_prompts`` prompts
    (sorted by prompt) that have at least two images; the mean weighs prompts equally."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    usable = sorted(prompt for prompt, members in groups.items() if len(members) >= 2)[:max_prompts]
    if not usable:
        return Diversity(math.nan, reason="no prompt has two or more images to compare")
    per_prompt_score = {}
    for prompt in usable:
        pairs = list(itertools.combinations(groups[prompt][:per_prompt], 2))
        first, second = (np.array(side) for side in zip(*pairs, strict=True))
        per_prompt_score[prompt] = float(ms_ssim(images[first], images[second]).mean())
    return Diversity(float(np.mean(list(per_prompt_score.values()))), per_prompt_score)
