"""Synthetic dataset folders as evaluation sets: checked, decoded, tagged with prompt and guidance scale, and
cut into variants (one per folder and guidance scale) for sweeps.

A folder is what `medsd generate` writes (train.csv, images/, data/ parquet, manifest.json), or any folder
with a CheXpert-style train.csv whose Paths are relative to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medsd.config import DataConfig
from medsd.evaluate.images import GUIDANCE_SCALE, PROMPT, ImageSet, decode_image_set
from medsd.labels import PATH_COLUMN

TRAIN_CSV = "train.csv"  # the file names of the synthetic dataset contract (DESIGN.md "Data contracts")
MANIFEST = "manifest.json"
PARQUET_FOLDER = "data"


@dataclass(frozen=True)
class SyntheticFolder:
    """One decoded synthetic folder and what its manifest says made it (empty for non-medsd folders)."""

    path: Path
    images: ImageSet
    model_hash: str | None
    plan: str | None
    curation: dict | None = None  # the manifest's curation section when `medsd curate` made the folder


def read_synthetic_folder(name: str, folder: str, base: DataConfig, labels: list[str]) -> SyntheticFolder:
    """Decode ``folder`` with ``base``'s policy, views and image size; ValueError naming the set ``name``
    (e.g. synthetic[0]) for a missing, empty or unfinished folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{name}: folder {path} does not exist; expected a `medsd generate` output")
    manifest = read_manifest_file(name, path)
    if manifest.get("status") not in (None, "complete"):
        raise ValueError(
            f"{name}: {path / MANIFEST} says status={manifest.get('status')!r}: generation did not finish; "
            "rerun the same `medsd generate` command to complete it"
        )
    csv_path = path / TRAIN_CSV
    if not csv_path.is_file():
        raise ValueError(f"{name}: {path} has no {TRAIN_CSV}; expected a dataset folder written by `medsd generate`")
    if len(csv_path.read_text(encoding="utf-8-sig").strip().splitlines()) < 2:
        raise ValueError(f"{name}: {csv_path} lists no images (a header only); the synthetic dataset is empty")
    images = decode_image_set(name, base.model_copy(update={"csv": str(csv_path), "root": str(path)}), labels)
    _attach_generation_metadata(name, images, path)
    made_by = manifest.get("model", {}).get("model_hash")
    return SyntheticFolder(path, images, made_by, manifest.get("plan", {}).get("kind"), manifest.get("curation"))


def read_manifest_file(name: str, path: Path) -> dict:
    """The manifest.json of the dataset folder ``path`` ({} when it has none); ValueError naming ``name`` if broken."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: {manifest_path} is not valid JSON ({error})") from None
    return manifest if isinstance(manifest, dict) else {}


def _attach_generation_metadata(name: str, images: ImageSet, path: Path) -> None:
    """Each image's own prompt and guidance scale from the parquet rows, matched by Path (when present)."""
    if not (path / PARQUET_FOLDER).is_dir():
        return
    try:
        table = pq.read_table(path / PARQUET_FOLDER, columns=[PATH_COLUMN, PROMPT, GUIDANCE_SCALE])
    except (pa.ArrowException, OSError) as error:
        raise ValueError(
            f"{name}: cannot read {PATH_COLUMN}, {PROMPT} and {GUIDANCE_SCALE} from {path / PARQUET_FOLDER} ({error}); "
            "expected the parquet rows `medsd generate` writes"
        ) from None
    metadata = table.to_pandas().drop_duplicates(PATH_COLUMN).set_index(PATH_COLUMN)
    paths = images.frame[PATH_COLUMN]
    images.frame[PROMPT] = paths.map(metadata[PROMPT]).fillna(images.frame[PROMPT])
    images.frame[GUIDANCE_SCALE] = paths.map(metadata[GUIDANCE_SCALE]).astype(float)


def guidance_scales(images: ImageSet) -> list[float]:
    """The distinct guidance scales of a set, ascending; [nan] when unknown."""
    scales = sorted(set(images.frame[GUIDANCE_SCALE].dropna().tolist()))
    return scales or [math.nan]


def select_guidance(images: ImageSet, scale: float | None) -> ImageSet:
    """The images made at ``scale`` (all of them for None); ValueError listing the scales the set has."""
    if scale is None:
        return images
    chosen = np.isclose(images.frame[GUIDANCE_SCALE].to_numpy(dtype=float), scale)
    if not chosen.any():
        raise ValueError(
            f"evaluate.guidance_scale: {scale} is not in {images.name} (its scales: {guidance_scales(images)})"
        )
    return images.subset(chosen)


def primary_variant(folders: list[SyntheticFolder], scale: float | None) -> int | None:
    """Which of split_variants(folders) holds exactly the arms' set (folder 0 at ``scale``), if one does:
    none when ``scale`` is None and folder 0 has several scales (the arms then train on all of them)."""
    scales = guidance_scales(folders[0].images)
    if scale is None:
        return 0 if len(scales) == 1 else None
    return next((i for i, s in enumerate(scales) if math.isclose(s, scale)), None)


def split_variants(folders: list[SyntheticFolder]) -> list[ImageSet]:
    """One set per folder and guidance scale, named for the report ('g4', or 'ckpt-500 g4' with several folders)."""
    variants = []
    for number, folder in enumerate(folders):
        scales = guidance_scales(folder.images)
        for scale in scales:
            part = [] if math.isnan(scale) else [f"g{scale:g}"]
            prefix = [f"{number}:{folder.path.name}"] if len(folders) > 1 else []
            name = " ".join(prefix + part) or folder.path.name
            variant = folder.images if len(scales) == 1 else select_guidance(folder.images, scale)
            variants.append(variant.subset(np.arange(len(variant)), name=name))
    return variants
