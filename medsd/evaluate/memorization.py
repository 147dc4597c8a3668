"""Memorization audit: each synthetic image's nearest training image by feature cosine and by pixel
correlation, and the share of synthetic images that are near-copies by both (notes/medical.md: latent
diffusion models memorized up to a third of small X-ray training sets)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK_ROWS = 4096  # reference rows per similarity block
TOLERANCE = 1e-5  # float32 cosines of identical vectors can land a few ulps either side of a threshold


@dataclass(frozen=True)
class NearestTraining:
    """Per image of a set: its nearest training image (index, similarity) by features and by pixels."""

    feature_index: np.ndarray
    feature_similarity: np.ndarray
    pixel_index: np.ndarray
    pixel_similarity: np.ndarray


@dataclass(frozen=True)
class MemorizationAudit:
    """A set's nearest training images judged against thresholds: ``memorized`` where both similarities reach
    theirs (a near-copy looks the same to the eye and to the network)."""

    nearest: NearestTraining
    feature_threshold: float
    pixel_threshold: float

    @property
    def memorized(self) -> np.ndarray:
        nearest = self.nearest
        return (nearest.feature_similarity >= self.feature_threshold - TOLERANCE) & (
            nearest.pixel_similarity >= self.pixel_threshold - TOLERANCE
        )

    @property
    def share(self) -> float:
        return float(self.memorized.mean())

    def top_pairs(self, n: int) -> list[tuple[int, int]]:
        """(set index, training index) of the ``n`` pairs with the highest pixel correlation."""
        order = np.argsort(-self.nearest.pixel_similarity, kind="stable")[:n]
        return [(int(i), int(self.nearest.pixel_index[i])) for i in order]


def find_nearest_training(
    images: np.ndarray, features: np.ndarray, training_images: np.ndarray, training_features: np.ndarray
) -> NearestTraining:
    """Nearest training image of every image of a set (images (N, S, S) uint8, features (N, D)).

    Features are centred on the training mean first: pooled ReLU features are all positive, so raw cosines
    of any two radiographs are high. Pixel similarity is the Pearson correlation of the two images.
    """
    centre = training_features.mean(axis=0, keepdims=True)
    feature_index, feature_similarity = nearest_by_cosine(features - centre, training_features - centre)
    pixel_index, pixel_similarity = nearest_by_cosine(_centred_pixels(images), _centred_pixels(training_images))
    return NearestTraining(feature_index, feature_similarity, pixel_index, pixel_similarity)


def calibrated_thresholds(reference: NearestTraining) -> tuple[float, float]:
    """(feature, pixel) thresholds: the highest similarity any image of ``reference`` (held-out real images,
    none of them a copy) has to the training set. Anything closer is closer than a new patient ever came."""
    return float(reference.feature_similarity.max()), float(reference.pixel_similarity.max())


def _centred_pixels(images: np.ndarray) -> np.ndarray:
    """(N, S*S) pixels minus each image's mean: their cosine is the images' Pearson correlation."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat - flat.mean(axis=1, keepdims=True)


def nearest_by_cosine(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row its most cosine-similar reference row: (index (N,) int64, similarity (N,) float32).

    Rows of zero norm have similarity 0 to everything; references are scanned in blocks of CHUNK_ROWS.
    """
    q = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), dim=1)
    r = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(references, dtype=np.float32)), dim=1)
    best = torch.full((len(q),), -2.0)
    index = torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(r), CHUNK_ROWS):
        similarity, position = (q @ r[start : start + CHUNK_ROWS].T).max(dim=1)  # (N,)
        better = similarity > best
        best = torch.where(better, similarity, best)
        index = torch.where(better, position + start, index)
    return index.numpy(), best.numpy()
