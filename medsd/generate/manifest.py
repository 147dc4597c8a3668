"""manifest.json of a synthetic dataset: what made it (config, model, plan), what it holds (counts, checksums),
how long it took, and what was skipped. Also the rule for resuming into an existing folder.

The manifest is written twice: with ``status: running`` before any image, claiming the folder for this plan,
and with ``status: complete`` at the end. A rerun may continue a folder only if its plan fingerprint and
model hash are the ones recorded; only the output location and the number of actors may differ.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from medsd.config import GenerateConfig
from medsd.generate.plan import GenerationPlan
from medsd.generate.storage import OutputFolder
from medsd.generate.writers import ShardRecord

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "medsd-synthetic-dataset"
MANIFEST_VERSION = 1
RUNNING = "running"
COMPLETE = "complete"
# Fields that change speed, not pixels. Batch size, CPU threads and device are content: they change how
# floating-point sums are grouped, which can move a pixel by one grey level (see medsd.generate.plan).
EXECUTION_FIELDS = ("out", "num_actors")
# Where the model is found does not matter, only what it is (model_hash).
MODEL_LOCATION_FIELDS = ("model", "cache_dir")


def content_config(cfg: GenerateConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that decide images, as JSON."""
    content = cfg.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))
    for name in MODEL_LOCATION_FIELDS:
        content["model"].pop(name)
    return content


def read_manifest(folder: OutputFolder) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none; ValueError when it is not a medsd dataset manifest."""
    data = folder.read(MANIFEST_FILE)
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder.path(MANIFEST_FILE)}: not valid JSON ({error}); not a medsd dataset") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{folder.path(MANIFEST_FILE)}: not a medsd synthetic dataset manifest")
    return manifest


def check_resumable(
    folder: OutputFolder, previous: dict[str, Any] | None, cfg: GenerateConfig, plan: GenerationPlan, model_hash: str
) -> None:
    """ValueError unless ``folder`` is new, empty, or was started with this plan and model.

    The message lists every content field and the model hash that differ, and how to proceed.
    """
    where = folder.describe()
    if previous is None:
        if not folder.is_empty():
            raise ValueError(
                f"generate.out: {where} is not empty and has no {MANIFEST_FILE}, so it is not a medsd synthetic "
                "dataset to resume; choose a new or empty folder"
            )
        return
    differences = _differences(previous.get("content_config", {}), content_config(cfg))
    if previous.get("model", {}).get("model_hash") != model_hash:
        differences.append(f"model hash {previous.get('model', {}).get('model_hash')} -> {model_hash}")
    if not differences and previous.get("plan", {}).get("fingerprint") != plan.fingerprint():
        differences.append("the plan (e.g. the source CSV's content) changed")
    if differences:
        raise ValueError(
            f"generate.out: {where} was made with a different config or model, refusing to resume into it: "
            + "; ".join(differences)
            + ". Use a new --out folder, or rerun with the config in its manifest.json"
        )


def new_manifest(
    cfg: GenerateConfig, plan: GenerationPlan, model_dir: str, model_hash: str, previous: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``running`` manifest of a run: config, model, plan; earlier runs into the folder are kept in ``runs``."""
    runs = list(previous.get("runs", [])) if previous else []
    runs.append({"started_at": _now(), "config": cfg.model_dump(mode="json")})
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "status": RUNNING,
        "synthetic": True,
        "created_at": previous.get("created_at", _now()) if previous else _now(),
        "config": cfg.model_dump(mode="json"),
        "content_config": content_config(cfg),
        "model": {
            "model": cfg.model.model,
            "model_dir": model_dir,
            "model_hash": model_hash,
            "adapter_hashes": plan.adapter_hashes,
        },
        "plan": {
            "kind": plan.kind,
            "images": len(plan.rows),
            "shards": len(plan.shards),
            "fingerprint": plan.fingerprint(),
            "source_csv_sha256": plan.source_sha256,
        },
        "runs": runs,
    }


def write_manifest(folder: OutputFolder, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically."""
    folder.write_atomic(MANIFEST_FILE, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())


def complete_manifest(
    manifest: dict[str, Any],
    plan: GenerationPlan,
    records: list[ShardRecord],
    csv_sha256: str,
    timings: dict[str, float],
    run_summary: dict[str, float],
) -> dict[str, Any]:
    """``manifest`` marked complete, with counts, checksums, timings and the bad-input report.

    ``run_summary``: rendered, kept, image_bytes, seconds and images_per_second of this run.
    """
    images_digest = hashlib.sha256("".join(record.images_digest for record in records).encode()).hexdigest()
    run = {
        **manifest["runs"][-1],
        "finished_at": _now(),
        "rendered": run_summary["rendered"],
        "kept": run_summary["kept"],
        "seconds": round(run_summary["seconds"], 3),
        "images_per_second": round(run_summary["images_per_second"], 3),
    }
    return {
        **manifest,
        "status": COMPLETE,
        "images": len(plan.rows),
        "images_per_label": plan.images_per_label(),
        "positive_rates": {name: round(rate, 6) for name, rate in plan.positive_rates().items()},
        "image_bytes": run_summary["image_bytes"],
        "checksums": {
            "algorithm": "sha256",
            "images": images_digest,  # over "id sha256" lines of every image, in plan order
            "train.csv": csv_sha256,
            "data": {record.shard.parquet_path: record.file_sha256 for record in records},
        },
        "timings": {name: round(value, 3) for name, value in timings.items()},
        "bad_input": {"source": plan.source_report.to_dict() if plan.source_report is not None else None},
        "runs": [*manifest["runs"][:-1], run],
    }


def _differences(before: dict[str, Any], after: dict[str, Any], prefix: str = "generate.") -> list[str]:
    """'generate.steps 4 -> 8' for each leaf that differs between two nested dicts."""
    found = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found.extend(_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            found.append(f"{prefix}{key} {json.dumps(old)} -> {json.dumps(new)}")
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
