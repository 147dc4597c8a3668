"""Training checkpoints: everything a resumed run needs, written so that a crash never leaves half of one.

A checkpoint folder holds ``trained.safetensors`` (the method's trained weights), ``training_state.pt``
(optimizer, LR scheduler, grad scaler, EMA, RNG states), ``state.json`` (step, data position, metrics
history, config fingerprint) and ``manifest.json``, written last, listing every file with its size. Folders
are built under a hidden staging name and renamed into place; :func:`load_checkpoint` refuses a folder whose
manifest is missing or disagrees with its files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medsd.train.batches import DataPosition

TRAINED_FILE = "trained.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FORMAT = "medsd-train-checkpoint-v1"
PUBLISHED_FOLDER_MODE = 0o755


@dataclass
class CheckpointContents:
    """What one checkpoint restores. Tensors are on the CPU."""

    step: int
    position: DataPosition
    trained: dict[str, torch.Tensor]  # the method's trained weights by name
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]  # "generator" (the loop's), "torch" (global CPU), "cuda" (when on a GPU)
    grad_scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per optimizer step
    fingerprint: dict[str, Any] = field(default_factory=dict)  # config fields a resumed run must share


def save_checkpoint(
    folder: str | Path, contents: CheckpointContents, extra_files: dict[str, Path] | None = None
) -> Path:
    """Write ``contents`` (plus ``extra_files``: name -> file to copy in) to ``folder``, atomically."""
    folder = Path(folder)
    staging = staging_folder(folder)
    try:
        # safetensors refuses tensors that share storage (tied weights): give each its own copy.
        save_file(
            {name: t.detach().cpu().contiguous().clone() for name, t in contents.trained.items()},
            str(staging / TRAINED_FILE),
        )
        torch.save(
            {
                "optimizer": contents.optimizer,
                "lr_scheduler": contents.lr_scheduler,
                "grad_scaler": contents.grad_scaler,
                "ema": contents.ema,
                "rng": contents.rng,
            },
            staging / TRAINING_STATE_FILE,
        )
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": contents.step,
            "position": {"epoch": contents.position.epoch, "batch": contents.position.batch},
            "fingerprint": contents.fingerprint,
            "history": contents.history,
        }
        (staging / STATE_FILE).write_text(json.dumps(state) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        _write_manifest(staging)
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_checkpoint(folder: str | Path) -> CheckpointContents:
    """Read a checkpoint written by :func:`save_checkpoint`; ValueError naming the folder if it is incomplete."""
    folder = Path(folder)
    check_complete(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {folder}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    # weights_only: a checkpoint is data; never run code from it.
    training_state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    return CheckpointContents(
        step=int(state["step"]),
        position=DataPosition(**state["position"]),
        trained=load_file(str(folder / TRAINED_FILE)),
        optimizer=training_state["optimizer"],
        lr_scheduler=training_state["lr_scheduler"],
        rng=training_state["rng"],
        grad_scaler=training_state["grad_scaler"],
        ema=training_state["ema"],
        history=state["history"],
        fingerprint=state["fingerprint"],
    )


def check_complete(folder: Path) -> None:
    """ValueError unless ``folder`` has a manifest and every file it lists, at the listed size."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {folder}: no {MANIFEST_FILE}, so it was not completely written; delete it")
    listed = json.loads(manifest_path.read_text())["files"]
    problems = []
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {size}")
    if problems:
        raise ValueError(f"checkpoint {folder} is incomplete: {'; '.join(problems)}; delete it")


def _write_manifest(folder: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    with open(folder / MANIFEST_FILE, "w") as handle:
        json.dump({"format": CHECKPOINT_FORMAT, "files": files}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())  # the manifest is the completion mark: make it durable before the rename


def replace_folder(staging: Path, target: Path) -> Path:
    """Move the finished ``staging`` folder to ``target``, replacing an older one: at every moment ``target``
    is either complete or absent (the old folder is renamed aside first, then deleted)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / target.name)
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


def staging_folder(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to build it in before :func:`replace_folder`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(PUBLISHED_FOLDER_MODE)  # mkdtemp makes 0700; the published folder is for other readers too
    return staging
