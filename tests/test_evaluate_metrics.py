"""medsd.evaluate metrics on cases with known answers: bootstrap AUC, Frechet distance, k-NN precision/recall,
MS-SSIM diversity and the memorization audit (no Ray)."""

import math

import numpy as np
import pytest

from medsd.classifier import build_classifier, penultimate_features
from medsd.evaluate import memorization
from medsd.evaluate.auc import paired_difference, score_aucs
from medsd.evaluate.diversity import ms_ssim, ms_ssim_scales, prompt_diversity
from medsd.evaluate.fidelity import frechet_distance, knn_precision_recall
from medsd.evaluate.memorization import (
    MemorizationAudit,
    calibrated_thresholds,
    find_nearest_training,
    nearest_by_cosine,
)
from medsd.labels import VIEW_COLUMN
from medsd.phantom import render_phantom_images

LABELS = ("a", "b")


@pytest.fixture(scope="module")
def phantoms() -> np.ndarray:
    """60 frontal phantom radiographs, 64 px: stand-ins for a training set and new images."""
    images, frame = render_phantom_images(90, 64, seed=5)
    frontal = images[(frame[VIEW_COLUMN] == "Frontal").to_numpy()]
    assert len(frontal) >= 60
    return frontal[:60]


@pytest.fixture(scope="module")
def features_of():
    """Penultimate features of a fixed random ResNet-18: a deterministic feature space for the audit."""
    import torch

    torch.manual_seed(0)
    model = build_classifier(2).eval()
    return lambda images: penultimate_features(model, images)


def toy_scores(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label a: scores separate the classes well; label b: every test image is negative."""
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, 2), dtype=np.float32)
    targets[: n // 2, 0] = 1
    probabilities = np.stack([targets[:, 0] * 0.5 + rng.random(n) * 0.6, rng.random(n)], axis=1)
    return targets, probabilities.astype(np.float32), np.ones_like(targets)


def test_bootstrap_auc_gives_intervals_around_the_estimate_and_nan_with_a_reason():
    targets, probabilities, mask = toy_scores()
    scores = score_aucs(targets, probabilities, mask, LABELS, bootstrap_samples=200, confidence=0.95, seed=0)
    low, high = scores.intervals["a"]
    assert 0.5 < low <= scores.aucs["a"] <= high < 1.0
    assert high - low > 0.01  # resampling 200 images moves the AUC
    assert math.isnan(scores.aucs["b"]) and "one class" in scores.reasons["b"]
    assert all(math.isnan(v) for v in scores.intervals["b"])
    assert scores.mean == pytest.approx(scores.aucs["a"])  # the mean is over the labels present only
    assert scores.bootstrap_means.shape == (200,)


def test_bootstrap_auc_reasons_and_pairing():
    targets, probabilities, mask = toy_scores()
    settings = {"bootstrap_samples": 100, "confidence": 0.9, "seed": 3}
    told = score_aucs(targets, probabilities, mask, LABELS, reasons={"a": "no positive training images"}, **settings)
    assert math.isnan(told.aucs["a"]) and told.reasons["a"] == "no positive training images"
    assert math.isnan(told.mean)

    scores = score_aucs(targets, probabilities, mask, LABELS, **settings)
    assert paired_difference(scores, scores, 0.9) == (0.0, (0.0, 0.0))
    worse = score_aucs(targets, probabilities * 0 + np.random.default_rng(1).random(probabilities.shape),
                       mask, LABELS, **settings)  # fmt: skip
    difference, (low, high) = paired_difference(worse, scores, 0.9)
    assert difference < 0 and low <= difference <= high < 0


def test_frechet_distance_known_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    a -= a.mean(axis=0)  # zero mean: scaling then changes only the covariance
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # A shift of the mean by 3 in every one of 8 dimensions adds 8 * 9 and nothing else.
    assert frechet_distance(a, a + 3.0) == pytest.approx(72.0, rel=1e-6)
    # Scaling by 2: tr(S) + tr(4S) - 2 tr(2S) = tr(S), about 8 for unit variance.
    assert frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)
    assert frechet_distance(a, rng.normal(size=(500, 8))) < 0.5
    with pytest.raises(ValueError, match="expected"):
        frechet_distance(a, a[:, :4])


def test_knn_precision_recall_known_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4)).astype(np.float32)
    assert knn_precision_recall(real, real, k=3) == (1.0, 1.0)
    assert knn_precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # Fakes collapsed on one tail of the real data (first coordinate > 1): precise, but they cover little of it.
    precision, recall = knn_precision_recall(real, real[real[:, 0] > 1], k=3)
    assert precision == 1.0 and recall < 0.6
    with pytest.raises(ValueError, match="more than k=3"):
        knn_precision_recall(real, real[:3], k=3)


def test_ms_ssim_known_cases(phantoms):
    assert ms_ssim_scales(64) == 3 and ms_ssim_scales(256) == 5
    same = ms_ssim(phantoms[:10], phantoms[:10])
    np.testing.assert_allclose(same, 1.0, atol=1e-9)
    forward, backward = ms_ssim(phantoms[:10], phantoms[10:20]), ms_ssim(phantoms[10:20], phantoms[:10])
    np.testing.assert_allclose(forward, backward, atol=1e-12)
    noise = np.random.default_rng(0).integers(0, 256, size=(10, 64, 64), dtype=np.uint8)
    unrelated = ms_ssim(noise, np.roll(noise, 1, axis=0))
    assert (unrelated < 0.1).all()
    assert (forward < 1).all() and forward.mean() > unrelated.mean() + 0.3  # two radiographs: alike, not identical
    with pytest.raises(ValueError, match="smaller than the 11 px window"):
        ms_ssim(noise[:, :8, :8], noise[:, :8, :8])


def test_prompt_diversity_compares_images_of_one_prompt(phantoms):
    copies = np.repeat(phantoms[:1], 3, axis=0)
    result = prompt_diversity(np.concatenate([copies, phantoms[1:4]]), ["p"] * 3 + ["q"] * 3, 4, 10)
    assert result.per_prompt["p"] == pytest.approx(1.0)  # three copies: no diversity at all
    assert result.per_prompt["q"] < 1.0
    assert result.mean_ms_ssim == pytest.approx((result.per_prompt["p"] + result.per_prompt["q"]) / 2)
    alone = prompt_diversity(phantoms[:3], ["x", "y", "z"], 4, 10)
    assert math.isnan(alone.mean_ms_ssim) and "two or more" in alone.reason


def test_memorization_of_a_set_against_itself_is_total_and_of_noise_is_nil(phantoms, features_of):
    training, held_out = phantoms[:40], phantoms[40:]
    training_features = features_of(training)
    thresholds = calibrated_thresholds(
        find_nearest_training(held_out, features_of(held_out), training, training_features)
    )
    assert all(t < 1.0 for t in thresholds)

    itself = MemorizationAudit(
        find_nearest_training(training, training_features, training, training_features), *thresholds
    )
    assert itself.share == 1.0
    np.testing.assert_array_equal(itself.nearest.pixel_index, np.arange(40))  # each image's nearest is itself

    noise = np.random.default_rng(0).integers(0, 256, size=(30, 64, 64), dtype=np.uint8)
    unrelated = MemorizationAudit(
        find_nearest_training(noise, features_of(noise), training, training_features), *thresholds
    )
    assert unrelated.share == 0.0
    assert unrelated.nearest.pixel_similarity.max() < 0.2

    # A copy with a little noise is still caught; top_pairs leads with the closest pair.
    near_copy = np.clip(training[7].astype(int) + np.random.default_rng(1).integers(-2, 3, (64, 64)), 0, 255)
    candidates = np.concatenate([noise[:5], near_copy[None].astype(np.uint8)])
    audit = MemorizationAudit(
        find_nearest_training(candidates, features_of(candidates), training, training_features), *thresholds
    )
    assert audit.memorized.tolist() == [False] * 5 + [True]
    assert audit.top_pairs(1) == [(5, 7)]


def test_nearest_by_cosine_scans_references_in_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    queries, references = rng.normal(size=(7, 5)), rng.normal(size=(23, 5))
    expected, _ = nearest_by_cosine(queries, references)
    monkeypatch.setattr(memorization, "CHUNK_ROWS", 4)
    index, similarity = nearest_by_cosine(queries, references)
    np.testing.assert_array_equal(index, expected)
    normalised = references / np.linalg.norm(references, axis=1, keepdims=True)
    brute = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ normalised.T
    np.testing.assert_array_equal(index, brute.argmax(axis=1))
    np.testing.assert_allclose(similarity, brute.max(axis=1), atol=1e-6)


@pytest.mark.parametrize(("network", "channels", "dims"), [("densenet121", 1, 1024), ("inception_v3", 3, 2048)])
def test_torchvision_extractors_load_local_weights(tmp_path, phantoms, network, channels, dims):
    """A chest X-ray DenseNet (1-channel stem) or an ImageNet Inception (3 channels, aux head) from a local file."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from medsd.config import EvaluateConfig, load_config
    from medsd.evaluate.features import build_extractor

    torch.manual_seed(0)
    source = getattr(torchvision.models, network)(weights=None, **({"init_weights": False} if channels == 3 else {}))
    state = source.state_dict()
    if channels == 1:
        state["features.conv0.weight"] = state["features.conv0.weight"].sum(dim=1, keepdim=True)
    weights = tmp_path / f"{network}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    settings = ["real.csv=r.csv", "synthetic=[s]", f"extractor={network}", f"extractor_weights={weights}"]
    cfg = load_config(EvaluateConfig, None, settings)
    extract = build_extractor(cfg, None, torch.device("cpu"))
    features = extract(phantoms[:3])
    assert features.shape == (3, dims) and features.dtype == np.float32
    np.testing.assert_allclose(extract(phantoms[:3]), features, rtol=1e-5)  # eval mode: deterministic
    assert not np.allclose(features[0], features[1])

    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a .safetensors file; convert"):
        build_extractor(cfg.model_copy(update={"extractor_weights": str(tmp_path / "weights.pt")}), None, "cpu")
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=f"is not a {network} state_dict"):
        build_extractor(cfg.model_copy(update={"extractor_weights": str(tmp_path / "other.safetensors")}), None, "cpu")
