"""Multi-label chest radiograph classifier: a torchvision ResNet with a 1-channel stem and one logit per label.

It measures whether synthetic data helps (per-label AUC, as in the CheXpert paper) and supplies the
features for Frechet distances. Device choice belongs to ``medsd.models``; functions here take a device.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from torch import nn

ARCHITECTURES = ("resnet18", "resnet50")
# AdamW's decoupled weight decay: a light regulariser for a small dataset (Loshchilov & Hutter 2019).
WEIGHT_DECAY = 1e-4
# Augmentation that keeps anatomy: shifts of up to 4% of the side and +-10% brightness / contrast. No flips
# (laterality is anatomy) and no random crops (the signs can sit at the image edge, e.g. costophrenic angles).
MAX_SHIFT_FRACTION = 0.04
MAX_INTENSITY_JITTER = 0.1


def build_classifier(num_labels: int, architecture: str = "resnet18", weights_path: str | None = None) -> nn.Module:
    """A randomly initialised (or locally loaded) ResNet taking (B, 1, H, W) in [-1, 1] -> (B, num_labels) logits.

    ``weights_path`` is a state_dict file (.safetensors or torch .pt/.pth) of the same architecture; a 3-channel
    stem (ImageNet weights) is summed to one channel and a head of another size is left freshly initialised.
    Nothing is ever downloaded.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels: got {num_labels}; expected at least 1")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: got {architecture!r}; expected one of {ARCHITECTURES}")
    model = getattr(torchvision.models, architecture)(weights=None, num_classes=num_labels)
    stem = model.conv1
    model.conv1 = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
    if weights_path is not None:
        _load_weights(model, Path(weights_path))
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    stem = state.get("conv1.weight")
    if stem is not None and stem.ndim == 4 and stem.shape[1] == 3:  # (64, 3, 7, 7): grey = R = G = B, so sum
        state["conv1.weight"] = stem.sum(dim=1, keepdim=True)
    if state.get("fc.weight") is not None and state["fc.weight"].shape != own["fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # another label set: fresh head
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = missing + unexpected + reshaped
    if problems:
        raise ValueError(
            f"weights_path {path}: not a {type(model).__name__} state_dict of this architecture; "
            f"{len(problems)} missing, unexpected or differently shaped keys, e.g. {problems[:5]}"
        )
    model.load_state_dict(state, strict=False)


def _to_input(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1] on ``device``."""
    pixels = torch.as_tensor(images).to(device)
    return (pixels.float() / 127.5 - 1.0).unsqueeze(1)


def _check_images(images: np.ndarray, batch_size: int) -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: got {images.dtype} array of shape {images.shape}; expected uint8 (N, H, W)")
    if len(images) == 0:
        raise ValueError("images: got no images")
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; expected at least 1")


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random shifts (border-replicated, no wrap-around) and brightness / contrast jitter per image."""
    n = batch.shape[0]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * MAX_SHIFT_FRACTION * 2  # grid units span 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(batch.device), list(batch.shape), align_corners=False)
    shifted = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = (torch.rand(n, 2, 1, 1, 1, generator=generator) * 2 - 1) * MAX_INTENSITY_JITTER
    contrast, brightness = (1 + jitter[:, 0]).to(batch.device), jitter[:, 1].to(batch.device)
    return (shifted * contrast + brightness).clamp(-1.0, 1.0)


def _masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the entries the uncertainty policy keeps (mask 1), CheXpert U-Ignore style."""
    losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def train_classifier(
    images: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    architecture: str = "resnet18",
    device: torch.device | None = None,
) -> nn.Module:
    """Train a fresh classifier on uint8 (N, H, W) images; ``targets``/``mask`` (N, L) from apply_uncertainty_policy.

    Deterministic for a seed on a given device; the global torch RNG is left as it was. Returns the model in eval mode.
    """
    _check_images(images, batch_size)
    if targets.ndim != 2 or targets.shape[0] != len(images) or mask.shape != targets.shape:
        raise ValueError(
            f"targets/mask: got shapes {targets.shape} and {mask.shape}; expected both (N, L) with N = {len(images)}"
        )
    if epochs < 1:
        raise ValueError(f"epochs: got {epochs}; expected at least 1")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: got {learning_rate}; expected > 0")
    device = device or torch.device("cpu")
    # fork_rng: seed initialisation and shuffling without changing anyone else's random stream.
    accelerators = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=accelerators, device_type="cuda" if device.type == "cpu" else device.type):
        torch.manual_seed(seed)
        model = build_classifier(targets.shape[1], architecture).to(device)
        _fit(model, images, targets, mask, epochs * len(images), batch_size, learning_rate, seed, device)
    return model.eval()


def _fit(
    model: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray,
    images_to_see: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
) -> None:
    """The loop: shuffle -> augment -> masked BCE -> AdamW step, until ``images_to_see`` images have been seen
    (whole shuffled passes, the last one cut short); the learning rate follows a cosine to zero."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    labels = torch.from_numpy(np.asarray(targets, dtype=np.float32))
    keep = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    passes = math.ceil(images_to_see / len(images))
    order = torch.cat([torch.randperm(len(images), generator=generator) for _ in range(passes)])[:images_to_see]
    # Cosine decay: large steps early, a settled model at the end without tuning a step schedule.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=math.ceil(images_to_see / batch_size))
    model.train()
    for start in range(0, images_to_see, batch_size):
        index = order[start : start + batch_size]
        if len(index) < 2:  # BatchNorm cannot normalise a batch of one
            continue
        batch = _augment(_to_input(pixels[index], device), generator)  # (B, 1, H, W)
        loss = _masked_bce(model(batch), labels[index].to(device), keep[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities (N, L) float32 for uint8 (N, H, W) images, in eval mode on the model's device."""
    _check_images(images, batch_size)
    model.eval()
    device = next(model.parameters()).device
    outputs = [
        torch.sigmoid(model(_to_input(images[start : start + batch_size], device))).cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(outputs).numpy().astype(np.float32)


@torch.no_grad()
def penultimate_features(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The pooled features that feed the head (N, D) float32 (D = 512 for resnet18, 2048 for resnet50)."""
    _check_images(images, batch_size)
    model.eval()
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].cpu()))
    try:
        for start in range(0, len(images), batch_size):
            model(_to_input(images[start : start + batch_size], device))
    finally:
        hook.remove()
    return torch.cat(captured).numpy().astype(np.float32)


def auc_per_label(
    targets: np.ndarray, probabilities: np.ndarray, mask: np.ndarray, observations: list[str] | tuple[str, ...]
) -> dict[str, float]:
    """ROC AUC per label over the entries ``mask`` keeps; NaN where those entries hold only one class."""
    targets, probabilities, mask = np.asarray(targets), np.asarray(probabilities), np.asarray(mask)
    if targets.ndim != 2 or probabilities.shape != targets.shape or mask.shape != targets.shape:
        raise ValueError(
            f"targets, probabilities, mask: got shapes {targets.shape}, {probabilities.shape}, {mask.shape}; "
            "expected the same (N, L)"
        )
    if len(observations) != targets.shape[1]:
        raise ValueError(f"observations: got {len(observations)} names for {targets.shape[1]} label columns")
    aucs = {}
    for column, observation in enumerate(observations):
        kept = mask[:, column] > 0
        truth = targets[kept, column]
        if len(np.unique(truth)) < 2:  # AUC is undefined, not 0.5
            aucs[observation] = float("nan")
        else:
            aucs[observation] = float(roc_auc_score(truth, probabilities[kept, column]))
    return aucs
