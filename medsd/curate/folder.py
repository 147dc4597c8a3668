"""The curated dataset folder: the same contract as a `medsd generate` output (images/, data/ parquet,
train.csv, manifest.json), holding only the kept images, plus curation.csv (every judged image, kept or not,
with the reason) and the judge. Written under a hidden staging name and moved into place when complete, so
an interrupted curation never leaves a folder that looks finished."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medsd.evaluate.synthetic import MANIFEST, PARQUET_FOLDER, TRAIN_CSV
from medsd.generate.plan import file_sha256
from medsd.labels import PATH_COLUMN

CURATION_CSV = "curation.csv"
IMAGES_FOLDER = "images"


def reusable_manifest(out: Path, content: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier curation of the same content into ``out``; None when ``out`` is new or empty.
    ValueError when ``out`` holds anything else (a curation never writes over other files)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("curation", {}).get("content") == content and manifest.get("status") == "complete":
            return manifest
    raise ValueError(
        f"curate.out: {out} is not empty and is not a finished curation of this source with this config; "
        "choose a new folder (a curation never writes over other files)"
    )


def write_curated_folder(
    source: Path, out: Path, kept_paths: set[str], curation_csv: bytes, extra_files: dict[str, Path], manifest: dict
) -> dict[str, Any]:
    """Write the kept images of ``source`` and their rows to ``out``; returns the manifest written.

    ``manifest``: the curation's own fields; counts and checksums of what was written are added here.
    ``extra_files``: name -> a file to move into the folder (the judge).
    """
    staging = out.parent / f".{out.name}.curating"
    if staging.exists():
        shutil.rmtree(staging)  # a curation interrupted before its move: nothing under it was final
    staging.mkdir(parents=True)
    for path in sorted(kept_paths):
        _link_or_copy(source / path, staging / path)
    csv_sha256 = _write_kept_csv_rows(source / TRAIN_CSV, staging / TRAIN_CSV, kept_paths)
    parquet = _write_kept_parquet_rows(source / PARQUET_FOLDER, staging / PARQUET_FOLDER, kept_paths)
    (staging / CURATION_CSV).write_bytes(curation_csv)
    for name, path in extra_files.items():
        shutil.move(path, staging / name)
    complete = {
        "format": "medsd-synthetic-dataset",
        "version": 1,
        "status": "complete",
        "synthetic": True,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **manifest,
        "images": len(kept_paths),
        "images_per_label": _images_per_label(kept_paths),
        "checksums": {
            "algorithm": "sha256",
            "train.csv": csv_sha256,
            "data": parquet,
            CURATION_CSV: hashlib.sha256(curation_csv).hexdigest(),
        },
    }
    (staging / MANIFEST).write_text(json.dumps(complete, indent=2, allow_nan=False) + "\n")
    if out.exists():
        out.rmdir()  # reusable_manifest let through only a missing or empty folder
    staging.rename(out)
    return complete


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space; a copy where the filesystem cannot link (another device)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_kept_csv_rows(source: Path, target: Path, kept_paths: set[str]) -> str:
    """train.csv with the header and the kept rows, values exactly as in the source; returns its sha256."""
    rows = list(csv.reader(io.StringIO(source.read_text(encoding="utf-8-sig"))))
    header, body = rows[0], rows[1:]
    path_index = header.index(PATH_COLUMN)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(row for row in body if row and row[path_index] in kept_paths)
    target.write_text(text.getvalue(), encoding="utf-8")
    return file_sha256(target)


def _write_kept_parquet_rows(source: Path, target: Path, kept_paths: set[str]) -> dict[str, str]:
    """Each parquet file of ``source`` with only the kept rows, at the same relative path (hive partitions
    stay as they were); a file left with no rows is not written. Returns relative path -> sha256."""
    if not source.is_dir():
        return {}
    wanted = pa.array(sorted(kept_paths), type=pa.string())
    checksums = {}
    for path in sorted(source.rglob("*.parquet")):
        table = pq.read_table(path, partitioning=None)
        kept = table.filter(pc.is_in(table[PATH_COLUMN], value_set=wanted))
        if kept.num_rows == 0:
            continue
        relative = path.relative_to(source)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(kept, target / relative)
        checksums[f"{PARQUET_FOLDER}/{relative.as_posix()}"] = file_sha256(target / relative)
    return checksums


def _images_per_label(kept_paths: set[str]) -> dict[str, int]:
    """Kept images per images/<label>/ folder."""
    counts: dict[str, int] = {}
    for path in kept_paths:
        parts = path.split("/")
        folder = parts[1] if len(parts) > 2 and parts[0] == IMAGES_FOLDER else "."
        counts[folder] = counts.get(folder, 0) + 1
    return dict(sorted(counts.items()))
