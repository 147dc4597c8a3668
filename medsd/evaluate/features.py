"""Image features for the Frechet distance, k-NN precision/recall and the memorization audit.

Default: the real-trained classifier's penultimate layer (domain features, nothing to download). Optional:
a torchvision Inception-v3 (the FID network) or DenseNet-121 (the usual chest X-ray backbone) whose weights
come from a local file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn

from medsd.classifier import build_classifier, penultimate_features
from medsd.config import EvaluateConfig

FeatureExtractor = Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S) -> float32 (N, D)

# Input side and the state_dict prefixes of the ImageNet heads a feature extractor drops.
NETWORKS = {
    "inception_v3": (299, ("fc.", "AuxLogits.")),
    "densenet121": (224, ("classifier.",)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH_SIZE = 32


def build_extractor(cfg: EvaluateConfig, classifier_state: dict | None, device: torch.device) -> FeatureExtractor:
    """The extractor ``cfg.extractor`` names; ``classifier_state`` is the real arm's state_dict."""
    if cfg.extractor == "classifier":
        if classifier_state is None:
            raise ValueError("evaluate.extractor: 'classifier' needs the real arm's trained weights")
        model = build_classifier(len(cfg.labels), cfg.architecture)
        model.load_state_dict(classifier_state)
        model.to(device).eval()
        return lambda images: penultimate_features(model, images)
    network = load_network(cfg.extractor, Path(cfg.extractor_weights)).to(device).eval()
    return lambda images: network_features(network, images, NETWORKS[cfg.extractor][0])


def load_network(name: str, weights_path: Path) -> nn.Module:
    """A torchvision ``name`` with its head replaced by the identity and weights from ``weights_path``.

    Weights may be 3-channel (ImageNet) or 1-channel (chest X-ray); the stem is built to match. Safetensors only,
    as for every model medsd loads: a pickled checkpoint can run code.
    """
    if not weights_path.is_file():
        raise FileNotFoundError(f"evaluate.extractor_weights: {weights_path} does not exist")
    if weights_path.suffix != ".safetensors":
        raise ValueError(
            f"evaluate.extractor_weights: {weights_path} is not a .safetensors file; convert a torch state_dict with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'weights.safetensors')"
        )
    state = load_file(str(weights_path))
    head_prefixes = NETWORKS[name][1]
    state = {k: v for k, v in state.items() if not k.startswith(head_prefixes)}
    if name == "inception_v3":
        network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        network.transform_input = False  # inputs are normalised here, channel by channel
        network.fc = nn.Identity()
    else:
        network = torchvision.models.densenet121(weights=None)
        network.classifier = nn.Identity()
    _match_stem_channels(network, state)
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"evaluate.extractor_weights: {weights_path} is not a {name} state_dict "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    return network


def _match_stem_channels(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the first convolution the input channels of the weights (1 for chest X-ray networks)."""
    name, stem = next((n, m) for n, m in network.named_modules() if isinstance(m, nn.Conv2d))
    channels = state.get(f"{name}.weight", torch.empty(0, 3)).shape[1]
    if channels != stem.in_channels:
        parent = network.get_submodule(name.rsplit(".", 1)[0]) if "." in name else network
        replacement = nn.Conv2d(channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
        setattr(parent, name.rsplit(".", 1)[-1], replacement)


@torch.no_grad()
def network_features(network: nn.Module, images: np.ndarray, side_px: int) -> np.ndarray:
    """Pooled features (N, D) float32: grey -> the network's channels, resized to ``side_px``, ImageNet-normalised."""
    device = next(network.parameters()).device
    stem = next(m for m in network.modules() if isinstance(m, nn.Conv2d))
    mean = torch.tensor(IMAGENET_MEAN[: stem.in_channels], device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD[: stem.in_channels], device=device).view(1, -1, 1, 1)
    outputs = []
    for start in range(0, len(images), BATCH_SIZE):
        pixels = torch.as_tensor(images[start : start + BATCH_SIZE], device=device).float().div(255.0)
        pixels = F.interpolate(pixels.unsqueeze(1), size=(side_px, side_px), mode="bilinear", align_corners=False)
        outputs.append(network((pixels.expand(-1, stem.in_channels, -1, -1) - mean) / std).flatten(1).cpu())
    return torch.cat(outputs).numpy().astype(np.float32)
