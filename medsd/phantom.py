"""The phantom: procedurally drawn CheXpert-style chest radiographs with visible, learnable disease signs.

Every workload runs on it by default (DESIGN.md, "The embedded defaults"). A study gets a CheXpert-like
raw label vector (1.0 / 0.0 / -1.0 / blank, with CheXpert-like prevalence and co-occurrence); its images
are drawn from an attenuation model on a coordinate grid: soft tissue, air-filled lungs, heart,
mediastinum, bones, then one painter per sign (an opacity replaces lung air, metal and bone add density).
Everything follows from the seed: one ``np.random.Generator`` per patient for labels and one per image for
pixels, so images can be rendered in any order or in parallel and stay byte-identical.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from medsd.config import PhantomConfig
from medsd.labels import (
    AGE_COLUMN,
    CHEXPERT_METADATA_COLUMNS,
    CHEXPERT_OBSERVATIONS,
    NEGATIVE,
    NO_FINDING,
    PATH_COLUMN,
    POSITIVE,
    PROJECTION_COLUMN,
    SEX_COLUMN,
    SEXES,
    UNCERTAIN,
    VIEW_COLUMN,
    VIEWS,
)

# Bump when sampling or drawing changes, so a folder written by older code is not reused.
PHANTOM_FORMAT_VERSION = 1
MANIFEST_NAME = "phantom.json"
_MANIFEST_FORMAT = "medsd-phantom"

# Independent random streams under one seed (np.random.default_rng([seed, stream, index])).
_PATIENT_STREAM = 1
_IMAGE_STREAM = 2
_SPLIT_STREAM = 3

T = TypeVar("T")

# --------------------------------------------------------------------------------------------------
# Labels: prevalence and co-occurrence roughly like CheXpert train (Irvin et al. 2019, Table 1).
# --------------------------------------------------------------------------------------------------

# Latent causes shared by several observations make labels co-occur as in CheXpert: fluid overload
# (edema with cardiomegaly and effusion), infection (consolidation with pneumonia) and inpatient care
# (support devices with pneumothorax).
_LATENT_PREVALENCE = {"fluid": 0.35, "infection": 0.15, "inpatient": 0.55}

# observation -> (latent it follows, P(positive | latent), P(positive | no latent)); the marginals land
# near CheXpert train, e.g. Edema 0.35 * 0.60 + 0.65 * 0.03 = 0.23, Support Devices 0.55 * 0.9 + 0.45 * 0.05 = 0.52.
_POSITIVE_RATES: dict[str, tuple[str | None, float, float]] = {
    "Enlarged Cardiomediastinum": ("fluid", 0.08, 0.03),
    "Cardiomegaly": ("fluid", 0.25, 0.05),
    "Lung Lesion": (None, 0.04, 0.04),
    "Edema": ("fluid", 0.60, 0.03),
    "Consolidation": ("infection", 0.35, 0.016),
    "Pneumonia": ("infection", 0.15, 0.005),
    "Pneumothorax": ("inpatient", 0.13, 0.03),
    "Pleural Effusion": ("fluid", 0.70, 0.22),
    "Pleural Other": (None, 0.016, 0.016),
    "Fracture": (None, 0.04, 0.04),
    "Support Devices": ("inpatient", 0.90, 0.05),
}
# Compressive atelectasis follows effusion: 0.39 * 0.22 + 0.61 * 0.10 = 0.15 overall.
_ATELECTASIS_RATE_WITH_EFFUSION = 0.22
_ATELECTASIS_RATE_OTHERWISE = 0.10
# Lung Opacity is positive when any child finding is, plus opacities the report does not name further.
OPACITY_CHILDREN = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
_UNSPECIFIED_OPACITY_RATE = 0.12

# Of the not-positive labels: share written -1.0 (uncertain) and, of the rest, share written 0.0 (mentioned
# negative); everything else stays blank ("not mentioned", the majority of CheXpert cells).
_UNCERTAIN_RATES = {
    "Enlarged Cardiomediastinum": 0.055,
    "Cardiomegaly": 0.04,
    "Lung Opacity": 0.045,
    "Lung Lesion": 0.006,
    "Edema": 0.075,
    "Consolidation": 0.13,
    "Pneumonia": 0.085,
    "Atelectasis": 0.17,
    "Pneumothorax": 0.016,
    "Pleural Effusion": 0.085,
    "Pleural Other": 0.012,
    "Fracture": 0.003,
    "Support Devices": 0.005,
}
_NEGATIVE_RATES = {
    "Enlarged Cardiomediastinum": 0.06,
    "Cardiomegaly": 0.05,
    "Lung Opacity": 0.01,
    "Lung Lesion": 0.01,
    "Edema": 0.12,
    "Consolidation": 0.14,
    "Pneumonia": 0.03,
    "Atelectasis": 0.005,
    "Pneumothorax": 0.30,
    "Pleural Effusion": 0.18,
    "Pleural Other": 0.001,
    "Fracture": 0.02,
    "Support Devices": 0.03,
}
# An uncertain mention shows its sign half of the time, so uncertainty is as ambiguous as in real reports.
UNCERTAIN_SIGN_PROBABILITY = 0.5
# Support Devices is not a pathology: CheXpert's No Finding ignores it (Irvin et al. 2019, section 2).
# No Finding needs no pathology positive or uncertain, and even then a report often names something outside
# the 14 observations (old granuloma, degenerative spine): 0.75 brings No Finding near CheXpert's 9-10%.
_NO_FINDING_WHEN_NORMAL_RATE = 0.75
_PATHOLOGIES = tuple(o for o in CHEXPERT_OBSERVATIONS if o not in (NO_FINDING, "Support Devices"))

# Patients and views, CheXpert-like: 59% male, age mean 60, most frontals AP (portable, inpatients).
_MALE_SHARE = 0.59
_AGE_MEAN, _AGE_SD, _AGE_MIN, _AGE_MAX = 61.0, 17.0, 18, 90
_AP_SHARE_WITH_DEVICES = 0.93
_AP_SHARE_WITHOUT_DEVICES = 0.70
_SECOND_STUDY_SHARE = 0.25


def sample_study_labels(rng: np.random.Generator) -> dict[str, float]:
    """Raw CheXpert values (1.0, 0.0, -1.0, NaN for blank) for the 14 observations of one study."""
    latent = {name: bool(rng.random() < p) for name, p in _LATENT_PREVALENCE.items()}
    positive: dict[str, bool] = {}
    for observation, (cause, rate_with, rate_without) in _POSITIVE_RATES.items():
        rate = rate_with if cause is not None and latent[cause] else rate_without
        positive[observation] = bool(rng.random() < rate)
    atelectasis_rate = _ATELECTASIS_RATE_WITH_EFFUSION if positive["Pleural Effusion"] else _ATELECTASIS_RATE_OTHERWISE
    positive["Atelectasis"] = bool(rng.random() < atelectasis_rate)
    positive["Lung Opacity"] = any(positive[c] for c in OPACITY_CHILDREN) or bool(
        rng.random() < _UNSPECIFIED_OPACITY_RATE
    )
    raw = {o: _written_value(o, positive[o], rng) for o in CHEXPERT_OBSERVATIONS if o != NO_FINDING}
    is_normal = not any(raw[o] in (POSITIVE, UNCERTAIN) for o in _PATHOLOGIES)
    raw[NO_FINDING] = POSITIVE if is_normal and rng.random() < _NO_FINDING_WHEN_NORMAL_RATE else math.nan
    return {o: raw[o] for o in CHEXPERT_OBSERVATIONS}


def _written_value(observation: str, is_positive: bool, rng: np.random.Generator) -> float:
    """How a report labeller writes one observation: positive, else uncertain, mentioned negative or blank."""
    if is_positive:
        return POSITIVE
    if rng.random() < _UNCERTAIN_RATES[observation]:
        return UNCERTAIN
    if rng.random() < _NEGATIVE_RATES[observation]:
        return NEGATIVE
    return math.nan


def _resolve_signs(findings: dict[str, float], rng: np.random.Generator) -> dict[str, float]:
    """Raw values -> what the image shows (1.0 drawn, 0.0 not): uncertain mentions are a coin flip."""
    unknown = sorted(set(findings) - set(CHEXPERT_OBSERVATIONS))
    if unknown:
        raise ValueError(f"findings: unknown observations {unknown}; expected names from CHEXPERT_OBSERVATIONS")
    shown: dict[str, float] = {}
    for observation in CHEXPERT_OBSERVATIONS:
        value = findings.get(observation, math.nan)
        if not (math.isnan(value) or value in (POSITIVE, NEGATIVE, UNCERTAIN)):
            raise ValueError(f"findings[{observation!r}]: got {value}; expected 1.0, 0.0, -1.0 or NaN (blank)")
        is_shown = value == POSITIVE or (value == UNCERTAIN and rng.random() < UNCERTAIN_SIGN_PROBABILITY)
        shown[observation] = POSITIVE if is_shown else NEGATIVE
    shown[NO_FINDING] = NEGATIVE if any(shown[o] == POSITIVE for o in _PATHOLOGIES) else POSITIVE
    return shown


# --------------------------------------------------------------------------------------------------
# Drawing: geometry on a patient coordinate grid. u runs left -> right of the image, v top -> bottom,
# both about -1..1; the patient's left is the image's right (radiological convention). Positions and sizes
# in the painters below are in these units (a lung is about 0.3 wide and 0.8 tall), ranges are the spread
# between patients.
# --------------------------------------------------------------------------------------------------

# Attenuation of the materials (arbitrary units; the exposure maps them to grey levels).
_SOFT_TISSUE = 0.45
_LUNG_AIR = 0.36  # subtracted where lung air is
_HEART_EXTRA = 0.15  # heart and great vessels are thicker than the chest wall in front of them
_BONE = 0.07
_METAL = 0.75
_VESSEL = 0.14
_FRONTAL_POSE_ROTATION_DEG = 4.0
_POSE_SHIFT = 0.05


@dataclass(frozen=True)
class _Grid:
    u: np.ndarray  # (H, W) float32, patient coordinate left -> right of the image
    v: np.ndarray  # (H, W) float32, patient coordinate top -> bottom
    pixel: float  # side of one pixel in patient units: the floor of every edge softness
    size_px: int


def _posed_grid(size_px: int, scale: float, rotation_deg: float, shift: tuple[float, float]) -> _Grid:
    """Image pixels -> patient coordinates under a small rotation, shift and body-size scale."""
    axis = (np.arange(size_px, dtype=np.float32) + 0.5) / size_px * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    cos, sin = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    x, y = x - shift[0], y - shift[1]
    u = (cos * x + sin * y) / scale
    v = (-sin * x + cos * y) / scale
    return _Grid(u.astype(np.float32), v.astype(np.float32), 2.0 / size_px / scale, size_px)


def _step(x: np.ndarray, softness: float) -> np.ndarray:
    """Smooth 0 -> 1 as x crosses 0 (width about ``softness``): anti-aliased region edges."""
    return 0.5 * (1.0 + np.tanh(x / softness))


def _ellipse_radius(
    grid: _Grid, center: tuple[float, float], half_axes: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    """Normalised elliptical radius (1 on the outline) of every pixel; ``angle`` in radians."""
    du, dv = grid.u - center[0], grid.v - center[1]
    if angle:
        cos, sin = math.cos(angle), math.sin(angle)
        du, dv = cos * du + sin * dv, -sin * du + cos * dv
    return np.sqrt((du / half_axes[0]) ** 2 + (dv / half_axes[1]) ** 2)


def _ellipse(
    grid: _Grid,
    center: tuple[float, float],
    half_axes: tuple[float, float],
    softness: float,
    angle: float = 0.0,
    edge_jitter: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Soft-edged filled ellipse in [0, 1]; ``edge_jitter`` (relative) makes the outline irregular."""
    radius = _ellipse_radius(grid, center, half_axes, angle)
    return _step((1.0 + edge_jitter - radius) * min(half_axes), max(softness, grid.pixel))


def _superellipse(
    grid: _Grid, center: tuple[float, float], half_axes: tuple[float, float], power: float, softness: float
) -> np.ndarray:
    """Soft-edged box-like ellipse (``power`` > 2 squares it off): a torso seen from the side."""
    across = np.abs((grid.u - center[0]) / half_axes[0]) ** power
    down = np.abs((grid.v - center[1]) / half_axes[1]) ** power
    return _step((1.0 - (across + down) ** (1.0 / power)) * min(half_axes), max(softness, grid.pixel))


def _polyline(grid: _Grid, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """Soft-edged line of ``width`` through ``points``; thinner than a pixel it fades instead of vanishing."""
    distance = np.full(grid.u.shape, np.inf, dtype=np.float32)
    for (u0, v0), (u1, v1) in zip(points[:-1], points[1:], strict=True):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((grid.u - u0) * du + (grid.v - v0) * dv) / max(du * du + dv * dv, 1e-12), 0.0, 1.0)
        np.minimum(distance, np.hypot(grid.u - (u0 + t * du), grid.v - (v0 + t * dv)), out=distance)
    effective = max(width, grid.pixel)
    return (width / effective) * _step(effective / 2 - distance, grid.pixel / 2)


def _smooth_noise(rng: np.random.Generator, size_px: int, cells: int) -> np.ndarray:
    """Unit-variance value noise with about ``cells`` blobs across the image (bilinear, smoothstepped)."""
    lattice = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    position = (np.arange(size_px, dtype=np.float32) + 0.5) / size_px * cells
    index = position.astype(np.int64)
    frac = position - index
    frac = frac * frac * (3.0 - 2.0 * frac)
    rows = lattice[index] * (1 - frac)[:, None] + lattice[index + 1] * frac[:, None]  # (S, cells + 2)
    noise = rows[:, index] * (1 - frac)[None, :] + rows[:, index + 1] * frac[None, :]  # (S, S)
    return noise / max(float(noise.std()), 1e-6)


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur: the detector's point spread, cheap at any size."""
    padded = np.pad(image, 1, mode="edge")
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


@dataclass
class _Film:
    """One radiograph being drawn: additive density, and where lung air and lung markings survive."""

    grid: _Grid
    density: np.ndarray
    air_kept: np.ndarray
    markings_kept: np.ndarray

    @classmethod
    def blank(cls, grid: _Grid) -> _Film:
        shape = grid.u.shape
        return cls(grid, np.zeros(shape, np.float32), np.ones(shape, np.float32), np.ones(shape, np.float32))

    def replace_air(self, fraction: np.ndarray) -> None:
        """An opacity: fluid, tissue or collapse takes the place of lung air (``fraction`` in [0, 1])."""
        self.air_kept *= 1.0 - np.clip(fraction, 0.0, 1.0)

    def add(self, density: np.ndarray) -> None:
        self.density += density

    def attenuation(self, lungs: np.ndarray, markings: np.ndarray) -> np.ndarray:
        """Total attenuation: tissue and bone, minus the air still in the lungs, plus visible vessels."""
        air = lungs * self.air_kept
        return self.density - _LUNG_AIR * air + _VESSEL * markings * air * self.markings_kept


@dataclass(frozen=True)
class _Lung:
    """One lung field on ``grid``: an ellipse cut by its diaphragm dome. ``outward`` (+1/-1 in u) points to the
    chest wall (lateral on a frontal, posterior on a lateral): the costophrenic angle and a pneumothorax rim."""

    grid: _Grid = field(repr=False)
    center: tuple[float, float]
    half_axes: tuple[float, float]
    outward: float
    dome_level: float  # v of the costophrenic angle
    dome_height: float
    hilum: tuple[float, float]

    def outward_position(self) -> np.ndarray:
        """-1 at the inner edge of the lung, +1 at the chest wall, for every pixel."""
        return self.outward * (self.grid.u - self.center[0]) / self.half_axes[0]

    def point(self, across: float, down: float) -> tuple[float, float]:
        """A point inside the lung ellipse from relative coordinates (-1..1 inner -> outer, top -> bottom)."""
        return (
            self.center[0] + self.outward * across * self.half_axes[0],
            self.center[1] + down * self.half_axes[1],
        )

    @cached_property
    def mask(self) -> np.ndarray:
        """Where the lung is, in [0, 1]: inside the ellipse and above the dome (highest mid-lung)."""
        t = self.outward_position()
        dome = self.dome_level - self.dome_height * np.clip(1.0 - t * t, 0.0, 1.0)
        above_dome = _step(dome - self.grid.v, max(0.012, self.grid.pixel))
        return (_ellipse(self.grid, self.center, self.half_axes, 0.015) * above_dome).astype(np.float32)


def _lung_markings(grid: _Grid, lungs: list[_Lung], rng: np.random.Generator) -> np.ndarray:
    """Vessels fanning out from each hilum and fading toward the periphery, plus fine parenchymal texture."""
    bend = _smooth_noise(rng, grid.size_px, 10)  # vessels curve
    breaks = _smooth_noise(rng, grid.size_px, 14)  # and branch off / leave the plane
    fine = _smooth_noise(rng, grid.size_px, max(8, grid.size_px // 5))
    markings = np.zeros_like(grid.u)
    for lung in lungs:
        du = lung.outward * (grid.u - lung.hilum[0])
        dv = grid.v - lung.hilum[1]
        radius = np.hypot(du, dv)
        angle = np.arctan2(dv, du)
        phase = rng.uniform(12, 16) * angle + 1.6 * bend + rng.uniform(0, 2 * np.pi)
        vessels = (0.5 + 0.5 * np.cos(phase)) ** 4 * _step(breaks + 0.6, 0.4)
        markings += vessels * np.exp(-radius / rng.uniform(0.3, 0.42))
    return np.clip(markings + 0.1 * fine, 0.0, None)


# ----- signs shared by both views: each paints on the film from the lungs it is given -----


def _irregular(rng: np.random.Generator, grid: _Grid, amount: float) -> np.ndarray:
    """Edge jitter for lesions: smooth noise scaled so the outline wanders by about ``amount``."""
    return amount * _smooth_noise(rng, grid.size_px, int(rng.integers(5, 10)))


def _paint_effusion(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """Basal fluid rising toward the chest wall (meniscus), blunting the costophrenic angle; one or both sides."""
    grid = film.grid
    sides = lungs if len(lungs) == 1 or rng.random() < 0.55 else [lungs[int(rng.integers(len(lungs)))]]
    for lung in sides:
        depth = rng.uniform(0.08, 0.3) * lung.half_axes[1] * 2
        meniscus = rng.uniform(0.12, 0.3)
        # The fluid climbs the chest wall: a surface concave upward, highest at the costophrenic angle.
        t = np.clip((lung.outward_position() + 1.0) / 2.0, 0.0, 1.0)
        surface = lung.dome_level - depth - meniscus * t**3
        fluid = _step(grid.v - surface, max(rng.uniform(0.015, 0.05), grid.pixel))
        if len(lungs) > 1:  # keep the fluid on its own side of the chest
            fluid = fluid * _step(lung.outward * grid.u, 0.02)
        film.replace_air(rng.uniform(0.85, 1.0) * fluid)
        film.markings_kept *= 1.0 - fluid


def _paint_edema(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """Bilateral perihilar (bat-wing) haze with blurred vessels and mottling."""
    grid = film.grid
    amount = rng.uniform(0.40, 0.70)
    mottle = 0.8 + 0.2 * _smooth_noise(rng, grid.size_px, max(6, grid.size_px // 8))
    for lung in lungs:
        spread = (lung.half_axes[0] * rng.uniform(0.9, 1.3), lung.half_axes[1] * rng.uniform(0.5, 0.75))
        radius = _ellipse_radius(grid, lung.hilum, spread)
        haze = amount * np.exp(-(radius**2)) * mottle
        film.replace_air(haze)
        film.markings_kept *= 1.0 - 0.8 * np.clip(haze, 0.0, 1.0)


def _paint_consolidation(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """Dense lobar opacity (upper, middle or lower zone), sometimes with a fissure edge and air bronchograms."""
    grid = film.grid
    lung = lungs[int(rng.integers(len(lungs)))]
    zone = rng.uniform(-0.6, 0.35)  # relative height of the lobe; the bases are left to effusion and collapse
    center = lung.point(rng.uniform(-0.2, 0.45), zone)
    half_axes = (lung.half_axes[0] * rng.uniform(0.6, 0.95), lung.half_axes[1] * rng.uniform(0.28, 0.45))
    region = _ellipse(grid, center, half_axes, 0.03, edge_jitter=_irregular(rng, grid, 0.12))
    if rng.random() < 0.4:  # a fissure gives the lobe a sharp, straight lower border
        region *= _step(center[1] + half_axes[1] * 0.5 - grid.v, grid.pixel)
    bronchi = np.zeros_like(grid.u)
    for _ in range(int(rng.integers(0, 4))):
        end = (center[0] + rng.uniform(-1, 1) * half_axes[0] * 0.8, center[1] + rng.uniform(-1, 1) * half_axes[1])
        bronchi = np.maximum(bronchi, _polyline(grid, [lung.hilum, center, end], rng.uniform(0.01, 0.02)))
    film.replace_air(region * (1.0 - 0.6 * bronchi))
    film.add(rng.uniform(0.03, 0.08) * region)  # a whole lobe of airless tissue: denser than a patch
    film.markings_kept *= 1.0 - region


def _paint_patches(
    film: _Film,
    lungs: list[_Lung],
    rng: np.random.Generator,
    count: tuple[int, int],
    radius: tuple[float, float],
    amount: tuple[float, float],
) -> None:
    """Several soft, mottled blobs clustered in one zone of one lung."""
    grid = film.grid
    lung = lungs[int(rng.integers(len(lungs)))]
    zone = (rng.uniform(-0.3, 0.6), rng.uniform(-0.6, 0.5))
    mottle = 0.75 + 0.25 * _smooth_noise(rng, grid.size_px, max(6, grid.size_px // 6))
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        center = lung.point(zone[0] + rng.uniform(-0.3, 0.3), zone[1] + rng.uniform(-0.2, 0.2))
        r = rng.uniform(*radius)
        blob = _ellipse(grid, center, (r, r * rng.uniform(0.7, 1.3)), r * 0.5)
        film.replace_air(rng.uniform(*amount) * blob * mottle)


def _paint_pneumonia(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """Patchy airspace opacity."""
    _paint_patches(film, lungs, rng, count=(3, 7), radius=(0.04, 0.08), amount=(0.3, 0.6))


def _paint_unspecified_opacity(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """An opacity the report calls only 'Lung Opacity'."""
    _paint_patches(film, lungs, rng, count=(1, 3), radius=(0.06, 0.12), amount=(0.25, 0.5))


def _paint_atelectasis(film: _Film, lungs: list[_Lung], rng: np.random.Generator, side: int) -> None:
    """Plate-like (discoid) linear opacities above the raised dome, sometimes a basal collapse wedge."""
    grid = film.grid
    lung = lungs[side % len(lungs)]
    top = lung.dome_level - lung.dome_height
    for _ in range(int(rng.integers(1, 4))):
        center_u = lung.point(rng.uniform(-0.1, 0.5), 0.0)[0]
        # Mid to lower zone, above where an effusion would hide it.
        center_v = rng.uniform(lung.center[1] - 0.05, max(top - 0.1, lung.center[1]))
        half_length = rng.uniform(0.14, 0.24)
        tilt = rng.uniform(-0.2, 0.2)
        start = (center_u - half_length, center_v - tilt * half_length)
        end = (center_u + half_length, center_v + tilt * half_length)
        film.replace_air(rng.uniform(0.85, 1.0) * _polyline(grid, [start, end], rng.uniform(0.05, 0.08)))
    if rng.random() < 0.5:
        wedge_center = lung.point(-0.55, 0.55)
        wedge = _ellipse(grid, wedge_center, (lung.half_axes[0] * 0.35, lung.half_axes[1] * 0.3), 0.03, angle=0.5)
        film.replace_air(rng.uniform(0.4, 0.7) * wedge)


def _paint_pneumothorax(film: _Film, lungs: list[_Lung], rng: np.random.Generator, strength: float) -> None:
    """Lung collapsed away from the chest wall and apex: a dark rim without markings and a thin pleural line."""
    grid = film.grid
    lung = lungs[int(rng.integers(len(lungs)))]
    shrink = rng.uniform(0.12, 0.35) * strength
    a, b = lung.half_axes
    center = (lung.center[0] - lung.outward * a * shrink, lung.center[1] + b * shrink * 0.6)
    half_axes = (a * (1 - shrink), b * (1 - shrink * 0.6))
    radius = _ellipse_radius(grid, center, half_axes)
    collapsed = _step((1.0 - radius) * min(half_axes), max(0.006, grid.pixel / 2))
    rim = lung.mask * (1.0 - collapsed)
    pleural_line = lung.mask * np.exp(-((((radius - 1.0) * min(half_axes)) / max(0.006, grid.pixel / 2)) ** 2))
    film.markings_kept *= 1.0 - rim
    film.add(-0.05 * rim + 0.12 * pleural_line)
    film.replace_air(0.25 * shrink * collapsed * lung.mask)


def _paint_nodule(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """One or two round, sometimes lobulated nodules (a mass when large) away from the hilum."""
    grid = film.grid
    for _ in range(1 if rng.random() < 0.8 else 2):
        lung = lungs[int(rng.integers(len(lungs)))]
        center = lung.point(rng.uniform(-0.1, 0.7), rng.uniform(-0.7, 0.35))
        r = rng.uniform(0.03, 0.07) if rng.random() < 0.8 else rng.uniform(0.08, 0.13)
        nodule = _ellipse(grid, center, (r, r), r * 0.15, edge_jitter=_irregular(rng, grid, 0.12))
        film.replace_air(nodule)
        film.add(0.06 * nodule)


def _paint_pleural_thickening(film: _Film, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """'Pleural Other': a band of thickened pleura along the chest wall or an apical cap."""
    grid = film.grid
    lung = lungs[int(rng.integers(len(lungs)))]
    thickness = rng.uniform(0.025, 0.05)
    radius = _ellipse_radius(grid, lung.center, lung.half_axes)
    band = _step(radius - (1.0 - thickness / min(lung.half_axes)), grid.pixel)
    if rng.random() < 0.5:  # apical cap
        window = _step(lung.center[1] - 0.6 * lung.half_axes[1] - grid.v, 0.03)
    else:  # along the lateral wall
        low, high = sorted(rng.uniform(-0.6, 0.6, size=2))
        window = (
            _step(lung.outward_position() - 0.5, 0.05)
            * _step(grid.v - (lung.center[1] + low * lung.half_axes[1]), 0.03)
            * _step(lung.center[1] + (high + 0.2) * lung.half_axes[1] - grid.v, 0.03)
        )
    film.replace_air(0.85 * band * window)


def _rib_bands(
    offset: np.ndarray, first: float, spacing: float, count: int, thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced bands along curves ``v = first + k * spacing + offset``, k < count, in one pass.

    Returns (band in [0, 1], rib number of each pixel): one periodic profile instead of a loop over ribs.
    """
    phase = (offset - first) / spacing
    number = np.round(phase)
    distance = (phase - number) * spacing
    band = np.exp(-((distance / thickness) ** 2)) * ((number >= 0) & (number < count))
    return band, number


def _paint_rib_fracture(film: _Film, rib: np.ndarray, u_break: float, v_break: float, rng: np.random.Generator) -> None:
    """Break a rib (``rib``: its density) at ``u_break``: a gap in the band and a callus blob beside it."""
    grid = film.grid
    gap = np.exp(-(((grid.u - u_break) / rng.uniform(0.012, 0.025)) ** 2))
    film.add(-rib * gap)
    callus_center = (u_break + rng.uniform(-0.03, 0.03), v_break)
    film.add(0.6 * float(rib.max()) * _ellipse(grid, callus_center, (0.03, 0.022), 0.012))


# --------------------------------------------------------------------------------------------------
# Frontal view
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chest:
    """Frontal geometry of one patient, after the signs that change anatomy (heart, mediastinum, domes)."""

    torso_half_width: float
    lung_center_u: float
    lung_center_v: float
    lung_half_axes: tuple[float, float]
    dome_levels: tuple[float, float]  # (image left = patient right, image right = patient left)
    dome_height: float
    cardiothoracic_ratio: float
    mediastinum_half_width: float
    atelectasis_side: int


def _sample_chest(signs: frozenset[str], rng: np.random.Generator) -> _Chest:
    lung_half_axes = (rng.uniform(0.28, 0.32), rng.uniform(0.74, 0.82))
    lung_center_v = rng.uniform(0.0, 0.08)
    costophrenic = lung_center_v + rng.uniform(0.6, 0.68)
    # The right hemidiaphragm (image left) usually sits a little higher than the left.
    dome_levels = [costophrenic - rng.uniform(0.0, 0.06), costophrenic]
    atelectasis_side = int(rng.integers(2))
    if "Atelectasis" in signs:  # volume loss pulls the hemidiaphragm up
        dome_levels[atelectasis_side] -= rng.uniform(0.12, 0.2)
    # Cardiothoracic ratio > 0.5 is the radiographic definition of cardiomegaly.
    ctr = rng.uniform(0.55, 0.68) if "Cardiomegaly" in signs else rng.uniform(0.38, 0.47)
    mediastinum = rng.uniform(0.19, 0.24) if "Enlarged Cardiomediastinum" in signs else rng.uniform(0.09, 0.13)
    return _Chest(
        torso_half_width=rng.uniform(0.86, 0.94),
        lung_center_u=rng.uniform(0.40, 0.44),
        lung_center_v=lung_center_v,
        lung_half_axes=lung_half_axes,
        dome_levels=(dome_levels[0], dome_levels[1]),
        dome_height=rng.uniform(0.17, 0.26),
        cardiothoracic_ratio=ctr,
        mediastinum_half_width=mediastinum,
        atelectasis_side=atelectasis_side,
    )


def _frontal_lungs(grid: _Grid, chest: _Chest) -> list[_Lung]:
    lungs = []
    for side, outward in enumerate((-1.0, 1.0)):
        center = (outward * chest.lung_center_u, chest.lung_center_v)
        hilum = (outward * (chest.mediastinum_half_width + 0.07), chest.lung_center_v - 0.05)
        lungs.append(
            _Lung(grid, center, chest.lung_half_axes, outward, chest.dome_levels[side], chest.dome_height, hilum)
        )
    return lungs


def _paint_frontal_body(film: _Film, chest: _Chest, sex: str, rng: np.random.Generator) -> None:
    """Torso with sloping shoulders and a neck; soft tissue is thicker at the centre; breasts on women."""
    grid = film.grid
    width = chest.torso_half_width * (1.0 + 0.05 * np.clip(grid.v, -1.0, 1.0))
    shoulder_top = -1.02 + 0.2 * (np.abs(grid.u) / chest.torso_half_width) ** 2
    torso = _step(width - np.abs(grid.u), 0.02) * _step(grid.v - shoulder_top, 0.03)
    neck = _step(0.2 - np.abs(grid.u), 0.02)
    body = np.maximum(torso, neck)
    thickness = 1.0 + 0.12 * np.clip(1.0 - (grid.u / chest.torso_half_width) ** 2, 0.0, 1.0)
    film.add(_SOFT_TISSUE * body * thickness)
    if sex == "Female":
        for outward in (-1.0, 1.0):
            center = (outward * rng.uniform(0.42, 0.52), chest.lung_center_v + rng.uniform(0.45, 0.6))
            film.add(0.08 * _ellipse(grid, center, (0.3, 0.22), 0.08))


def _paint_frontal_heart(film: _Film, chest: _Chest, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """Mediastinum, trachea, aortic knob and heart (two thirds to the patient's left, i.e. image right)."""
    grid = film.grid
    thoracic_width = 2 * (chest.lung_center_u + chest.lung_half_axes[0])
    heart_width = chest.cardiothoracic_ratio * thoracic_width
    tilt = rng.uniform(0.35, 0.6)  # long axis points down and to the patient's left
    aspect = rng.uniform(0.72, 0.82)
    half_a = heart_width / 2 / math.sqrt(math.cos(tilt) ** 2 + (aspect * math.sin(tilt)) ** 2)
    half_b = half_a * aspect
    vertical_half = math.sqrt((half_a * math.sin(tilt)) ** 2 + (half_b * math.cos(tilt)) ** 2)
    # The heart rests on the left hemidiaphragm: its lower border sinks a little below the dome's top.
    bottom = lungs[1].dome_level - chest.dome_height + rng.uniform(0.03, 0.08)
    center = (heart_width / 2 - heart_width / 3, bottom - vertical_half)
    heart = _ellipse(grid, center, (half_a, half_b), 0.02, angle=tilt)

    upper = _step(center[1] - grid.v, 0.05)
    mediastinum = _step(chest.mediastinum_half_width - np.abs(grid.u - 0.01), 0.02) * upper
    aortic_knob = _ellipse(grid, (chest.mediastinum_half_width * 0.9, chest.lung_center_v - 0.42), (0.07, 0.06), 0.02)
    solid = np.maximum(np.maximum(heart, mediastinum), aortic_knob)
    film.replace_air(solid)
    film.add(_HEART_EXTRA * solid)
    trachea = _polyline(grid, [(0.0, -1.1), (0.0, chest.lung_center_v - 0.3)], rng.uniform(0.07, 0.09))
    film.add(-0.12 * trachea)


_RIBS = 11


def _paint_frontal_bones(
    film: _Film, chest: _Chest, lungs: list[_Lung], age: int, fracture: bool, rng: np.random.Generator
) -> None:
    """Spine, posterior and anterior ribs over the thoracic cage, clavicles, humeral heads; bone thins with age."""
    grid = film.grid
    bone = _BONE * (1.15 - 0.3 * (age - _AGE_MIN) / (_AGE_MAX - _AGE_MIN))
    vertebrae = 0.7 + 0.3 * np.cos(grid.v * 2 * np.pi / rng.uniform(0.1, 0.13))
    film.add(2.0 * bone * _step(0.07 - np.abs(grid.u), 0.015) * vertebrae)

    spacing = chest.lung_half_axes[1] * 2 / 10.5
    first = chest.lung_center_v - chest.lung_half_axes[1] - 0.04
    thickness = rng.uniform(0.02, 0.028)
    # Posterior ribs leave the spine, rise a little to ``peak`` and curve down toward the chest wall.
    drop, peak = rng.uniform(0.35, 0.5), rng.uniform(0.15, 0.25)
    posterior_offset = grid.v - drop * ((np.abs(grid.u) - peak) ** 2 - peak**2)
    posterior, number = _rib_bands(posterior_offset, first, spacing, _RIBS, thickness)
    broken_side, broken_rib = int(rng.integers(2)), int(rng.integers(3, 9))
    for side_index, lung in enumerate(lungs):
        # Ribs belong to the thoracic cage: around the lung, fading out below the costophrenic angle.
        cage = _ellipse(grid, lung.center, (lung.half_axes[0] + 0.1, lung.half_axes[1] + 0.12), 0.05)
        cage = cage * _step(lung.dome_level + 0.12 - grid.v, 0.06) * _step(lung.outward * grid.u - 0.05, 0.02)
        film.add(bone * posterior * cage)
        if fracture and side_index == broken_side:
            u_break = lung.outward * (lung.center[0] * lung.outward + rng.uniform(-0.1, 0.25))
            x = abs(u_break)
            v_break = first + broken_rib * spacing + drop * ((x - peak) ** 2 - peak**2)
            _paint_rib_fracture(film, bone * posterior * cage * (number == broken_rib), u_break, v_break, rng)
        # Anterior ribs run down toward the sternum and fade where cartilage takes over.
        x = np.clip(lung.outward_position(), -1.0, 1.0)
        anterior, _ = _rib_bands(grid.v + 0.18 * (1.0 - x), first + 2.5 * spacing, spacing, _RIBS, thickness)
        film.add(0.6 * bone * anterior * cage * _step(x + 0.3, 0.15))
        outward = lung.outward
        clavicle = [(outward * 0.07, first + 0.1), (outward * 0.35, first + 0.06), (outward * 0.7, first - 0.04)]
        film.add(2.5 * bone * _polyline(grid, clavicle, rng.uniform(0.04, 0.055)))
        humerus = _ellipse(grid, (outward * (chest.torso_half_width - 0.02), first + 0.02), (0.1, 0.12), 0.02)
        film.add(2.5 * bone * humerus)


def _paint_frontal_devices(film: _Film, chest: _Chest, lungs: list[_Lung], rng: np.random.Generator) -> None:
    """Endotracheal tube, central venous line, nasogastric tube, ECG leads, pacemaker: at least one."""
    grid = film.grid
    kinds = [k for k in ("et_tube", "central_line", "ng_tube", "ecg", "pacemaker") if rng.random() < 0.45]
    kinds = kinds or ["et_tube"]
    carina_v = chest.lung_center_v - 0.3
    for kind in kinds:
        if kind == "et_tube":
            tip = carina_v - rng.uniform(0.08, 0.25)
            for wall in (-0.018, 0.018):
                film.add(_METAL * _polyline(grid, [(wall, -1.1), (wall, tip)], 0.012))
        elif kind == "central_line":
            side = rng.choice([-1.0, 1.0])
            entry = (side * rng.uniform(0.45, 0.65), chest.lung_center_v - chest.lung_half_axes[1] - 0.1)
            tip = (-0.06, carina_v + rng.uniform(0.15, 0.3))  # in the superior vena cava
            path = [entry, (side * 0.2, entry[1] + 0.1), (-0.05, carina_v + 0.05), tip]
            film.add(_METAL * _polyline(grid, path, 0.015))
        elif kind == "ng_tube":
            stomach = (lungs[1].center[0] * rng.uniform(0.6, 0.9), lungs[1].dome_level + rng.uniform(0.1, 0.2))
            path = [(0.02, -1.1), (0.03, carina_v), (0.08, lungs[1].dome_level - 0.1), stomach]
            film.add(0.8 * _METAL * _polyline(grid, path, 0.013))
        elif kind == "ecg":
            for _ in range(int(rng.integers(2, 5))):
                center = (rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.5))
                film.add(_METAL * _ellipse(grid, center, (0.03, 0.03), 0.006))
        else:
            box = (rng.uniform(0.4, 0.6), rng.uniform(-0.75, -0.6))
            film.add(1.3 * _METAL * _ellipse(grid, box, (0.08, 0.05), 0.01))
            film.add(_METAL * _polyline(grid, [box, (0.05, carina_v + 0.1), (0.15, chest.lung_center_v + 0.35)], 0.012))


def _draw_frontal(signs: frozenset[str], sex: str, age: int, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation map (size_px, size_px) of a PA/AP chest radiograph showing ``signs``."""
    chest = _sample_chest(signs, rng)
    scale = rng.uniform(0.95, 1.05) * (0.94 if sex == "Female" else 1.0)
    rotation = rng.uniform(-_FRONTAL_POSE_ROTATION_DEG, _FRONTAL_POSE_ROTATION_DEG)
    grid = _posed_grid(size_px, scale, rotation, tuple(rng.uniform(-_POSE_SHIFT, _POSE_SHIFT, size=2)))
    film = _Film.blank(grid)
    lungs = _frontal_lungs(grid, chest)
    _paint_frontal_body(film, chest, sex, rng)
    _paint_frontal_heart(film, chest, lungs, rng)
    _paint_frontal_bones(film, chest, lungs, age, "Fracture" in signs, rng)
    _paint_shared_signs(film, lungs, signs, chest.atelectasis_side, pneumothorax_strength=1.0, rng=rng)
    if "Support Devices" in signs:
        _paint_frontal_devices(film, chest, lungs, rng)
    gastric_bubble = _ellipse(grid, (lungs[1].center[0] * 0.8, lungs[1].dome_level + 0.1), (0.09, 0.05), 0.02)
    film.add(-0.25 * rng.uniform(0.0, 1.0) * gastric_bubble)
    lung_fields = lungs[0].mask + lungs[1].mask
    return film.attenuation(lung_fields, _lung_markings(grid, lungs, rng))


def _paint_shared_signs(
    film: _Film,
    lungs: list[_Lung],
    signs: frozenset[str],
    atelectasis_side: int,
    pneumothorax_strength: float,
    rng: np.random.Generator,
) -> None:
    """Signs drawn the same way on both views (the lungs carry the view's geometry)."""
    if "Pleural Effusion" in signs:
        _paint_effusion(film, lungs, rng)
    if "Edema" in signs:
        _paint_edema(film, lungs, rng)
    if "Consolidation" in signs:
        _paint_consolidation(film, lungs, rng)
    if "Pneumonia" in signs:
        _paint_pneumonia(film, lungs, rng)
    if "Atelectasis" in signs:
        _paint_atelectasis(film, lungs, rng, atelectasis_side)
    if "Lung Lesion" in signs:
        _paint_nodule(film, lungs, rng)
    has_named_opacity = any(c in signs for c in OPACITY_CHILDREN)
    if "Lung Opacity" in signs and not has_named_opacity:
        _paint_unspecified_opacity(film, lungs, rng)
    if "Pneumothorax" in signs:
        _paint_pneumothorax(film, lungs, rng, pneumothorax_strength)
    if "Pleural Other" in signs:
        _paint_pleural_thickening(film, lungs, rng)


# --------------------------------------------------------------------------------------------------
# Lateral view: anterior to the image left, spine posterior, heart anterior-inferior, one lung field.
# --------------------------------------------------------------------------------------------------

_LATERAL_PNEUMOTHORAX_STRENGTH = 0.6  # a pneumothorax is harder to see on a lateral


def _draw_lateral(signs: frozenset[str], sex: str, age: int, size_px: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation map (size_px, size_px) of a lateral chest radiograph showing ``signs``."""
    scale = rng.uniform(0.95, 1.05) * (0.94 if sex == "Female" else 1.0)
    grid = _posed_grid(size_px, scale, rng.uniform(-3, 3), tuple(rng.uniform(-_POSE_SHIFT, _POSE_SHIFT, size=2)))
    film = _Film.blank(grid)
    depth = rng.uniform(0.74, 0.84)  # anteroposterior half-depth of the chest
    body = _superellipse(grid, (0.0, 0.1), (depth, 1.25), 3.0, 0.03)
    arms = _ellipse(grid, (rng.uniform(-0.1, 0.1), -0.95), (0.7, 0.28), 0.08)
    film.add(_SOFT_TISSUE * np.maximum(body, 0.8 * arms))

    dome_level = rng.uniform(0.6, 0.7)
    if "Atelectasis" in signs:
        dome_level -= rng.uniform(0.06, 0.12)
    lung = _Lung(
        grid,
        (0.02, -0.02),
        (depth - 0.2, rng.uniform(0.74, 0.8)),
        1.0,
        dome_level,
        rng.uniform(0.12, 0.2),
        (0.08, -0.05),
    )
    heart_scale = rng.uniform(1.3, 1.45) if "Cardiomegaly" in signs else rng.uniform(0.95, 1.08)
    heart_center = (-0.22 + 0.1 * (heart_scale - 1.0), dome_level - 0.3)
    heart = _ellipse(grid, heart_center, (0.27 * heart_scale, 0.25 * heart_scale), 0.02, angle=0.35)
    film.replace_air(heart)
    film.add(_HEART_EXTRA * heart)
    if "Enlarged Cardiomediastinum" in signs:  # fills the retrosternal clear space
        film.replace_air(0.8 * _ellipse(grid, (-0.33, -0.3), (0.18, 0.3), 0.05))
    film.add(0.1 * _ellipse(grid, lung.hilum, (0.1, 0.12), 0.04))
    film.add(-0.1 * _polyline(grid, [(-0.02, -1.1), (0.06, -0.2)], 0.06))  # trachea
    _paint_lateral_bones(film, depth, age, rng)
    _paint_shared_signs(film, [lung], signs, 0, _LATERAL_PNEUMOTHORAX_STRENGTH, rng)
    if "Support Devices" in signs:
        _paint_lateral_devices(film, depth, rng)
    return film.attenuation(lung.mask, _lung_markings(grid, [lung], rng))


def _paint_lateral_bones(film: _Film, depth: float, age: int, rng: np.random.Generator) -> None:
    """Vertebral bodies with disc spaces behind the lung, sternum in front, faint oblique ribs."""
    grid = film.grid
    bone = _BONE * (1.15 - 0.3 * (age - _AGE_MIN) / (_AGE_MAX - _AGE_MIN))
    spine_u = depth - 0.24 + 0.05 * grid.v**2  # a slight kyphosis
    period = rng.uniform(0.13, 0.16)
    discs = _step(np.cos(grid.v * 2 * np.pi / period) + 0.7, 0.2)
    film.add(2.2 * bone * _step(0.1 - np.abs(grid.u - spine_u), 0.015) * discs)
    sternum = _polyline(grid, [(-depth + 0.08, -0.6), (-depth + 0.14, 0.35)], 0.05)
    film.add(1.6 * bone * sternum)
    for rib in range(8):
        start = -0.75 + rib * 0.19
        film.add(0.5 * bone * _polyline(grid, [(depth - 0.15, start), (-0.3, start + 0.35)], 0.03))


def _paint_lateral_devices(film: _Film, depth: float, rng: np.random.Generator) -> None:
    """Endotracheal tube in the trachea, nasogastric tube behind the heart, ECG leads on the front."""
    grid = film.grid
    film.add(_METAL * _polyline(grid, [(-0.07, -1.1), (0.05, rng.uniform(-0.5, -0.35))], 0.015))
    if rng.random() < 0.6:
        film.add(0.8 * _METAL * _polyline(grid, [(0.0, -1.1), (0.15, 0.0), (0.1, 0.9)], 0.013))
    for _ in range(int(rng.integers(1, 4))):
        film.add(_METAL * _ellipse(grid, (-depth + 0.02, rng.uniform(-0.5, 0.5)), (0.025, 0.03), 0.006))


# --------------------------------------------------------------------------------------------------
# Exposure: attenuation -> 8-bit grey levels with per-patient technique and detector noise.
# --------------------------------------------------------------------------------------------------


def _expose(attenuation: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert transmission, windowed and gamma-adjusted per image, plus mottle and quantum noise."""
    size_px = attenuation.shape[0]
    attenuation = attenuation + 0.02 * _smooth_noise(rng, size_px, 4)  # uneven exposure
    image = 1.0 - np.exp(-rng.uniform(2.0, 2.6) * np.clip(attenuation, 0.0, None))
    image = image ** rng.uniform(0.85, 1.2)
    low, high = rng.uniform(0.0, 0.06), rng.uniform(0.85, 0.98)
    image = (image - low) / (high - low)
    image = image + rng.uniform(0.01, 0.025) * rng.standard_normal(image.shape).astype(np.float32)
    image = _blur(image)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def render_radiograph(
    findings: dict[str, float], view: str, sex: str, age: int, size_px: int, rng: np.random.Generator
) -> np.ndarray:
    """One chest radiograph (size_px, size_px) uint8 showing ``findings`` (observation -> raw CheXpert value).

    Positive findings are drawn; uncertain (-1.0) ones with probability 0.5; blank, missing and 0.0 are not.
    """
    if view not in VIEWS:
        raise ValueError(f"view: got {view!r}; expected one of {VIEWS}")
    if sex not in SEXES:
        raise ValueError(f"sex: got {sex!r}; expected one of {SEXES}")
    if not 16 <= size_px <= 4096:
        raise ValueError(f"size_px: got {size_px}; expected 16..4096")
    shown = _resolve_signs(findings, rng)
    return _render_shown(shown, view, sex, age, size_px, rng)


def _render_shown(
    shown: dict[str, float], view: str, sex: str, age: int, size_px: int, rng: np.random.Generator
) -> np.ndarray:
    """Pixels of an image whose signs are already decided (1.0 shown, 0.0 not)."""
    signs = frozenset(o for o, value in shown.items() if value == POSITIVE and o != NO_FINDING)
    draw = _draw_frontal if view == "Frontal" else _draw_lateral
    return _expose(draw(signs, sex, int(age), size_px, rng), rng)


# --------------------------------------------------------------------------------------------------
# The dataset: plan (patients, studies, views, labels) -> images -> CheXpert-layout folder.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PlannedImage:
    """One row of the dataset before it is written: who, which view, what the report says, what is shown."""

    index: int  # position in the plan; seeds the image's pixels
    patient: int  # position of the patient in the plan
    study: int  # 1-based within the patient
    view: str
    projection: str | None
    sex: str
    age: int
    labels: dict[str, float]  # raw values as the report labeller writes them (train)
    shown: dict[str, float]  # what the image shows; also the radiologist-consensus label (valid)


def _plan_patient(seed: int, patient: int, lateral_fraction: float) -> list[_PlannedImage]:
    """Every image of one patient (1 or 2 studies, a lateral for some), from the patient's own stream."""
    rng = np.random.default_rng([seed, _PATIENT_STREAM, patient])
    sex = "Male" if rng.random() < _MALE_SHARE else "Female"
    age = int(np.clip(round(rng.normal(_AGE_MEAN, _AGE_SD)), _AGE_MIN, _AGE_MAX))
    images = []
    for study in range(1, 3 if rng.random() < _SECOND_STUDY_SHARE else 2):
        labels = sample_study_labels(rng)
        shown = _resolve_signs(labels, rng)  # one decision per study, so frontal and lateral agree
        ap_share = _AP_SHARE_WITH_DEVICES if shown["Support Devices"] == POSITIVE else _AP_SHARE_WITHOUT_DEVICES
        projection = "AP" if rng.random() < ap_share else "PA"
        views = ["Frontal", "Lateral"] if rng.random() < lateral_fraction else ["Frontal"]
        for view in views:
            images.append(
                _PlannedImage(
                    -1,
                    patient,
                    study,
                    view,
                    projection if view == "Frontal" else None,
                    sex,
                    min(age + study - 1, _AGE_MAX),
                    labels,
                    shown,
                )
            )
    return images


def _plan_images(n_images: int, seed: int, lateral_fraction: float) -> list[_PlannedImage]:
    """Exactly ``n_images`` images: whole patients in order, the last one cut short if needed."""
    planned: list[_PlannedImage] = []
    patient = 0
    while len(planned) < n_images:
        for image in _plan_patient(seed, patient, lateral_fraction)[: n_images - len(planned)]:
            planned.append(_replace_index(image, len(planned)))
        patient += 1
    return planned


def _replace_index(image: _PlannedImage, index: int) -> _PlannedImage:
    return _PlannedImage(
        index, image.patient, image.study, image.view, image.projection, image.sex, image.age, image.labels, image.shown
    )


def _valid_patients(n_patients: int, valid_fraction: float, seed: int) -> set[int]:
    """A seeded random share of patients for valid.csv (at least one when the fraction is positive)."""
    if valid_fraction <= 0 or n_patients < 2:
        return set()
    count = min(n_patients - 1, max(1, round(valid_fraction * n_patients)))
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    return {int(p) for p in rng.choice(n_patients, size=count, replace=False)}


def _metadata_row(image: _PlannedImage) -> dict[str, object]:
    return {SEX_COLUMN: image.sex, AGE_COLUMN: image.age, VIEW_COLUMN: image.view, PROJECTION_COLUMN: image.projection}


def _valid_labels(image: _PlannedImage) -> dict[str, float]:
    """Radiologist consensus, as in CheXpert valid.csv: what the image shows, no blanks, no uncertain."""
    return dict(image.shown)


@dataclass(frozen=True)
class _ImageJob:
    """One image to render (and, with ``target``, to save as PNG): all a worker process needs."""

    image: _PlannedImage
    size_px: int
    seed: int
    target: Path | None = None


def _render_job(job: _ImageJob) -> np.ndarray:
    """Pixels of one planned image; its own stream (seed, index) makes the order of rendering irrelevant."""
    rng = np.random.default_rng([job.seed, _IMAGE_STREAM, job.image.index])
    return _render_shown(job.image.shown, job.image.view, job.image.sex, job.image.age, job.size_px, rng)


def _save_job(job: _ImageJob) -> None:
    """Render and write a single-channel PNG in the worker, so pixels never travel between processes."""
    assert job.target is not None  # set by _write_dataset for every job
    job.target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_render_job(job)).save(job.target, format="PNG")


# Spawning workers costs a few seconds of imports; worth it from about 1,000 images of 128 px (5 ms each).
_PARALLEL_MIN_PIXELS = 1000 * 128 * 128
_WORKERS = 2
_CHUNK = 32  # images per task sent to a worker


def _map_images(function: Callable[[_ImageJob], T], jobs: list[_ImageJob]) -> Iterator[T]:
    """``function`` over ``jobs`` in order, with a progress bar; in a 2-process spawn pool when worth it
    (spawn, not fork: forking after torch or Ray started threads can deadlock)."""
    workers = min(_WORKERS, os.cpu_count() or 1)
    is_parallel = workers > 1 and sum(job.size_px**2 for job in jobs) >= _PARALLEL_MIN_PIXELS
    with tqdm(total=len(jobs), desc="phantom images", unit="img", disable=None, leave=False) as progress:
        if not is_parallel:
            for job in jobs:
                yield function(job)
                progress.update()
            return
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(function, jobs, chunksize=_CHUNK):
                yield result
                progress.update()


def render_phantom_images(n: int, size_px: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """``n`` phantom radiographs in memory, (n, size_px, size_px) uint8, and their CheXpert columns minus Path.

    The images are the first ``n`` of the plan ``write_phantom`` uses (mostly frontal, raw train-style labels).
    """
    if n < 1:
        raise ValueError(f"n: got {n}; expected at least 1 image")
    cfg = PhantomConfig(n_images=n, image_size_px=size_px, seed=seed)
    planned = _plan_images(n, seed, cfg.lateral_fraction)
    pixels = np.stack(list(_map_images(_render_job, [_ImageJob(image, size_px, seed) for image in planned])))
    rows = [{**_metadata_row(image), **image.labels} for image in planned]
    columns = [c for c in CHEXPERT_METADATA_COLUMNS if c != PATH_COLUMN] + list(CHEXPERT_OBSERVATIONS)
    return pixels, pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class PhantomSummary:
    """What ``write_phantom`` produced (or found already complete)."""

    out: Path
    n_train: int
    n_valid: int
    n_lateral: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"phantom: {self.n_train} train + {self.n_valid} valid images ({self.n_lateral} lateral) "
            f"in {self.out} ({self.seconds:.1f} s)"
        )


def write_phantom(out: str | Path, cfg: PhantomConfig) -> PhantomSummary:
    """Write the phantom dataset (train.csv, valid.csv, PNG tree, phantom.json) to ``out``.

    Written to a temporary sibling and renamed into place, so a half-written folder never looks complete;
    if ``out`` already holds a complete phantom of the same config, it is reused as is.
    """
    started = time.perf_counter()
    out = Path(out)
    reused = _reusable_summary(out, cfg)
    if reused is not None:
        return PhantomSummary(out, reused.n_train, reused.n_valid, reused.n_lateral, time.perf_counter() - started)
    _check_writable(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        counts = _write_dataset(staging, cfg)
        try:
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            os.replace(staging, out)
        except OSError:
            # Another process (say a second Ray worker) finished the same phantom first: use theirs.
            if _reusable_summary(out, cfg) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PhantomSummary(out, *counts, seconds=time.perf_counter() - started)


def _write_dataset(folder: Path, cfg: PhantomConfig) -> tuple[int, int, int]:
    """Plan, split by patient, render and write every file; phantom.json last marks the folder complete."""
    planned = _plan_images(cfg.n_images, cfg.seed, cfg.lateral_fraction)
    n_patients = planned[-1].patient + 1
    valid = _valid_patients(n_patients, cfg.valid_fraction, cfg.seed)
    # CheXpert numbers train patients first, then valid ones, from patient00001.
    ordered = sorted(range(n_patients), key=lambda p: (p in valid, p))
    number = {patient: position + 1 for position, patient in enumerate(ordered)}
    rows: dict[str, list[dict[str, object]]] = {"train": [], "valid": []}
    jobs = []
    for image in planned:
        split = "valid" if image.patient in valid else "train"
        name = "view1_frontal.png" if image.view == "Frontal" else "view2_lateral.png"
        path = f"{split}/patient{number[image.patient]:05d}/study{image.study}/{name}"
        labels = _valid_labels(image) if split == "valid" else image.labels
        rows[split].append({PATH_COLUMN: path, **_metadata_row(image), **labels})
        jobs.append(_ImageJob(image, cfg.image_size_px, cfg.seed, folder / path))
    for _ in _map_images(_save_job, jobs):
        pass
    for split, split_rows in rows.items():
        _write_csv(folder / f"{split}.csv", split_rows)
    n_lateral = sum(image.view == "Lateral" for image in planned)
    counts = (len(rows["train"]), len(rows["valid"]), n_lateral)
    manifest = {
        "format": _MANIFEST_FORMAT,
        "version": PHANTOM_FORMAT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "n_train": counts[0],
        "n_valid": counts[1],
        "n_lateral": counts[2],
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """CheXpert formatting: columns in CheXpert order, labels as 1.0 / 0.0 / -1.0 / blank, Age an integer."""
    frame = pd.DataFrame(rows, columns=list(CHEXPERT_METADATA_COLUMNS) + list(CHEXPERT_OBSERVATIONS))
    frame[AGE_COLUMN] = frame[AGE_COLUMN].astype("Int64")
    for observation in CHEXPERT_OBSERVATIONS:
        frame[observation] = frame[observation].astype(np.float64)
    frame.to_csv(path, index=False, lineterminator="\n")


def _reusable_summary(out: Path, cfg: PhantomConfig) -> PhantomSummary | None:
    """The summary of a complete phantom of this very config already in ``out``, else None."""
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    is_same = (
        manifest.get("format") == _MANIFEST_FORMAT
        and manifest.get("version") == PHANTOM_FORMAT_VERSION
        and manifest.get("config") == cfg.model_dump(mode="json")
    )
    if not is_same:
        return None
    return PhantomSummary(out, int(manifest["n_train"]), int(manifest["n_valid"]), int(manifest["n_lateral"]), 0.0)


def _check_writable(out: Path) -> None:
    """Refuse to replace anything but an empty folder or an older phantom: never clobber someone's data."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"phantom output {out} exists and is not a folder; choose another path")
    if any(out.iterdir()):
        if (out / MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"phantom output {out} holds a phantom of another config or version ({out / MANIFEST_NAME}); "
                "delete it or choose another folder"
            )
        raise FileExistsError(f"phantom output {out} exists and is not empty; choose a new or empty folder")
