import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from medsd.classifier import (
    auc_per_label,
    build_classifier,
    penultimate_features,
    predict_probabilities,
    train_classifier,
)
from medsd.config import PhantomConfig
from medsd.labels import COMPETITION_FIVE, PATH_COLUMN, VIEW_COLUMN, UncertaintyPolicy, apply_uncertainty_policy
from medsd.phantom import write_phantom

# The learnability check: frontal phantom radiographs at 64 px, a small ResNet-18 trained for a few epochs.
# 2,700 images seen twice beat 1,800 seen three times at the same cost: more patients, less memorising.
LEARNABILITY_PHANTOM = PhantomConfig(n_images=2700, image_size_px=64, seed=0, valid_fraction=0.2, lateral_fraction=0.0)
LEARNABILITY_AUC = 0.9


def read_split(root, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and competition-five targets/mask (U-Ignore) through the written CSV and PNGs."""
    frame = pd.read_csv(root / f"{split}.csv")
    assert (frame[VIEW_COLUMN] == "Frontal").all()
    images = np.stack([np.asarray(Image.open(root / path)) for path in frame[PATH_COLUMN]])
    targets, mask = apply_uncertainty_policy(frame[list(COMPETITION_FIVE)].to_numpy(), UncertaintyPolicy.IGNORE)
    return images, targets, mask


@pytest.mark.slow
def test_competition_five_are_learnable_from_the_phantom(tmp_path):
    write_phantom(tmp_path / "phantom", LEARNABILITY_PHANTOM)
    train_images, train_targets, train_mask = read_split(tmp_path / "phantom", "train")
    valid_images, valid_targets, valid_mask = read_split(tmp_path / "phantom", "valid")
    assert train_images.shape[1:] == (64, 64)

    model = train_classifier(
        train_images, train_targets, train_mask, epochs=2, batch_size=16, learning_rate=1e-3, seed=0
    )
    probabilities = predict_probabilities(model, valid_images, batch_size=128)
    aucs = auc_per_label(valid_targets, probabilities, valid_mask, COMPETITION_FIVE)
    print("phantom valid AUC:", {k: round(v, 3) for k, v in aucs.items()})
    assert all(v >= LEARNABILITY_AUC for v in aucs.values()), aucs


def test_auc_per_label_on_a_toy_case():
    targets = np.array([[0, 1], [0, 0], [1, 1], [1, 0]], dtype=np.float32)
    probabilities = np.array([[0.1, 0.9], [0.4, 0.2], [0.35, 0.3], [0.8, 0.7]], dtype=np.float32)
    mask = np.ones_like(targets)
    aucs = auc_per_label(targets, probabilities, mask, ["a", "b"])
    assert aucs["a"] == pytest.approx(0.75)  # 3 of the 4 positive-negative pairs ranked right
    assert aucs["b"] == pytest.approx(0.75)
    # Masked entries do not count: dropping the misranked negative makes "a" perfect.
    mask[1, 0] = 0
    assert auc_per_label(targets, probabilities, mask, ["a", "b"])["a"] == pytest.approx(1.0)


def test_auc_per_label_is_nan_when_a_label_has_one_class():
    targets = np.array([[0, 1], [0, 0], [0, 1]], dtype=np.float32)
    probabilities = np.full_like(targets, 0.5)
    mask = np.array([[1, 1], [1, 0], [1, 1]], dtype=np.float32)  # "b" keeps only positives
    aucs = auc_per_label(targets, probabilities, mask, ["a", "b"])
    assert math.isnan(aucs["a"]) and math.isnan(aucs["b"])
    empty = auc_per_label(targets, probabilities, np.zeros_like(mask), ["a", "b"])
    assert all(math.isnan(v) for v in empty.values())


def test_auc_per_label_rejects_mismatched_inputs():
    targets = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="expected the same"):
        auc_per_label(targets, np.zeros((4, 3)), np.ones((4, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="observations: got 1 names for 2"):
        auc_per_label(targets, targets, np.ones((4, 2)), ["a"])


@pytest.mark.parametrize(("architecture", "features"), [("resnet18", 512), ("resnet50", 2048)])
def test_build_classifier_takes_one_channel_and_gives_one_logit_per_label(architecture, features):
    model = build_classifier(3, architecture).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    images = np.zeros((2, 64, 64), dtype=np.uint8)
    assert penultimate_features(model, images, batch_size=1).shape == (2, features)


def test_build_classifier_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="architecture: got 'vgg16'"):
        build_classifier(2, "vgg16")
    with pytest.raises(ValueError, match="num_labels: got 0"):
        build_classifier(0)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        build_classifier(2, weights_path=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "resnet50.pt"
    torch.save(build_classifier(2, "resnet50").state_dict(), wrong)
    with pytest.raises(ValueError, match="not a ResNet state_dict of this architecture"):
        build_classifier(2, "resnet18", weights_path=str(wrong))


def test_build_classifier_loads_local_weights(tmp_path):
    source = build_classifier(4)
    torch.save(source.state_dict(), tmp_path / "same.pt")
    loaded = build_classifier(4, weights_path=str(tmp_path / "same.pt"))
    pairs = zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    # ImageNet-style weights: 3-channel stem summed to one channel, a 1000-way head replaced by a fresh one.
    imagenet_like = torchvision.models.resnet18(weights=None).state_dict()
    save_file(imagenet_like, str(tmp_path / "imagenet.safetensors"))
    adapted = build_classifier(4, weights_path=str(tmp_path / "imagenet.safetensors"))
    assert torch.allclose(adapted.conv1.weight, imagenet_like["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(adapted.layer4[1].conv2.weight, imagenet_like["layer4.1.conv2.weight"])
    assert adapted.fc.out_features == 4


def tiny_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(12, 32, 32), dtype=np.uint8)
    targets = rng.integers(0, 2, size=(12, 2)).astype(np.float32)
    return images, targets, np.ones_like(targets)


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    images, targets, mask = tiny_data()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    def train(seed: int) -> np.ndarray:
        model = train_classifier(images, targets, mask, epochs=1, batch_size=6, learning_rate=1e-3, seed=seed)
        return predict_probabilities(model, images, batch_size=5)

    first, second, other = train(0), train(0), train(1)
    assert torch.equal(torch.rand(1), expected_next)
    assert first.shape == (12, 2) and first.dtype == np.float32
    assert ((first >= 0) & (first <= 1)).all()
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_training_ignores_masked_labels():
    """A label whose every entry is masked gets no gradient: its head row stays as initialised."""
    images, targets, mask = tiny_data()
    mask[:, 1] = 0
    model = train_classifier(images, targets, mask, epochs=1, batch_size=6, learning_rate=1e-2, seed=0)
    torch.manual_seed(0)
    initial = build_classifier(2)
    # AdamW's weight decay still shrinks the row a little, so compare directions of change, not equality.
    moved = (model.fc.weight - initial.fc.weight).abs().sum(dim=1)
    assert moved[1] < 0.05 * moved[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": np.zeros((12, 32, 32), dtype=np.float32)}, "images: got float32"),
        ({"targets": np.zeros((11, 2), dtype=np.float32)}, "targets/mask: got shapes"),
        ({"epochs": 0}, "epochs: got 0"),
        ({"batch_size": 0}, "batch_size: got 0"),
        ({"learning_rate": 0.0}, "learning_rate: got 0.0"),
    ],
)
def test_train_classifier_rejects_bad_arguments(change, message):
    images, targets, mask = tiny_data()
    arguments = {"images": images, "targets": targets, "mask": mask}
    settings = {"epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "seed": 0}
    for key, value in change.items():
        (arguments if key in arguments else settings)[key] = value
    with pytest.raises(ValueError, match=message):
        train_classifier(arguments["images"], arguments["targets"], arguments["mask"], **settings)
