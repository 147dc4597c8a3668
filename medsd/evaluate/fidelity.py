"""How close synthetic images are to real ones in a feature space: the Frechet distance (FID's formula,
Heusel et al. 2017) and k-NN precision and recall (Kynkaanniemi et al. 2019)."""

from __future__ import annotations

import numpy as np
import torch

CHUNK_ROWS = 1024  # distance-matrix rows per step: memory stays O(CHUNK_ROWS x N)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features ``a`` (N, D) and ``b`` (M, D).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in float64 through symmetric
    eigendecompositions (no scipy sqrtm, which can return complex noise); 0 for a set against itself.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: got features {a.shape} and {b.shape}; expected (>=2, D) each")
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_power(cov_a, 0.5)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0.0, None)).sum()
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
    return float(max(distance, 0.0))


def _psd_power(matrix: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.clip(values, 0.0, None) ** power) @ vectors.T


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """(precision, recall): the share of ``fake`` inside the real manifold (the union of balls reaching each real
    point's k-th nearest real neighbour) and the share of ``real`` inside the fake manifold."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"knn_precision_recall: needs more than k={k} images per set, got {len(real)} and {len(fake)}")
    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    real_radii, fake_radii = _kth_neighbour_distance(real_t, k), _kth_neighbour_distance(fake_t, k)
    precision = _inside_any_ball(fake_t, real_t, real_radii).double().mean().item()
    recall = _inside_any_ball(real_t, fake_t, fake_radii).double().mean().item()
    return precision, recall


def _kth_neighbour_distance(points: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) distance from each point to its k-th nearest other point (position 0 of the sort is itself)."""
    radii = [
        torch.cdist(points[s : s + CHUNK_ROWS], points).kthvalue(k + 1, dim=1).values
        for s in range(0, len(points), CHUNK_ROWS)
    ]
    return torch.cat(radii)


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(Q,) bool: is each query within radius of at least one centre."""
    inside = [
        (torch.cdist(queries[s : s + CHUNK_ROWS], centres) <= radii.unsqueeze(0)).any(dim=1)
        for s in range(0, len(queries), CHUNK_ROWS)
    ]
    return torch.cat(inside)
