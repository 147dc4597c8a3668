"""The judge: a multi-label classifier trained on the real images, saved with the labels and image size it
reads, so a later curation can reuse it and a mismatch is an error instead of a silent wrong verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from medsd.classifier import build_classifier, predict_probabilities, train_classifier
from medsd.config import JudgeConfig
from medsd.evaluate.images import ImageSet, shared_arrays_readable
from medsd.models import select_device

JUDGE_FILE = "judge.safetensors"


@dataclass(frozen=True)
class Judge:
    """A trained judge: its weights (on CPU) and what it was trained to read."""

    state_dict: dict[str, torch.Tensor]
    labels: tuple[str, ...]
    architecture: str
    image_size_px: int

    def model(self, device: torch.device) -> nn.Module:
        model = build_classifier(len(self.labels), self.architecture)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def train_judge(real: ImageSet, cfg: JudgeConfig, device_choice: str) -> Judge:
    """Ray task: train a fresh judge on ``real`` (every image, cfg.epochs passes)."""
    device = select_device(device_choice)
    with shared_arrays_readable():
        model = train_classifier(
            real.images,
            real.targets,
            real.mask,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=cfg.seed,
            architecture=cfg.architecture,
            device=device,
        )
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return Judge(state, real.labels, cfg.architecture, real.images.shape[-1])


def judge_probabilities(judge: Judge, images: ImageSet, device_choice: str) -> np.ndarray:
    """Ray task: the judge's probabilities (N, L) for ``images``."""
    with shared_arrays_readable():
        return predict_probabilities(judge.model(select_device(device_choice)), images.images)


def save_judge(judge: Judge, path: Path) -> None:
    metadata = {
        "labels": json.dumps(list(judge.labels)),
        "architecture": judge.architecture,
        "image_size_px": str(judge.image_size_px),
    }
    save_file({name: tensor.contiguous() for name, tensor in judge.state_dict.items()}, str(path), metadata)
    path.chmod(0o644)  # safetensors writes 0600; the judge is part of a dataset others read


def load_judge(path: Path, labels: list[str], image_size_px: int) -> Judge:
    """A judge saved by ``save_judge``; ValueError naming the file when it reads other labels or sizes."""
    if not path.is_file():
        raise FileNotFoundError(f"curate.judge.weights_path: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata() or {}
            state = {name: weights.get_tensor(name) for name in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"curate.judge.weights_path: {path} is not a safetensors file ({error})") from None
    if "labels" not in metadata:
        raise ValueError(f"curate.judge.weights_path: {path} was not saved by `medsd curate` (no labels in it)")
    judge = Judge(
        state, tuple(json.loads(metadata["labels"])), metadata["architecture"], int(metadata["image_size_px"])
    )
    if list(judge.labels) != list(labels):
        raise ValueError(f"curate.judge.weights_path: {path} judges {list(judge.labels)}; curate.labels is {labels}")
    if judge.image_size_px != image_size_px:
        raise ValueError(
            f"curate.judge.weights_path: {path} reads {judge.image_size_px} px images; "
            f"real.image_size_px is {image_size_px}"
        )
    return judge
