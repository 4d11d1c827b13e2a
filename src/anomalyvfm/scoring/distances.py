"""Scoring arithmetic in numpy, shared by the torch pipeline and the torch-free runtime.

The fitted state (kNN bank, Mahalanobis mean and whitener, foreground direction) is learnt by the torch
classes in `scorers` and `features.foreground`, the view statistics by `head.scores`; applying it is the few
lines here, so an exported model scores with exactly the code the model was validated with.
"""
from __future__ import annotations

from typing import Hashable

import numpy as np
from scipy.ndimage import maximum_filter

from anomalyvfm.data.resample import resize

CHUNK = 8192  # rows scored at once: bounds memory on very large images


def _rows(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x.reshape(-1, x.shape[-1])


def unit_rows(features) -> np.ndarray:
    """Feature rows, each L2-normalised (the cosine distances compare directions)."""
    x = _rows(features)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def knn_distance(features, bank: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Cosine distance of each feature row to its nearest row of the unit-norm `bank`.

    `exclude`: indices of bank rows left out of the search. Out-of-fold scoring of a training image
    excludes the rows that came from that image, so its scores are those of a normal image the bank
    has not seen (in-sample, its own patches would be at distance ~0). At least one row must remain.
    """
    x, excluding = unit_rows(features), exclude is not None and len(exclude) > 0
    if excluding and len(np.unique(exclude)) >= len(bank):
        raise ValueError("knn_distance: every bank row is excluded")
    out = []
    for i in range(0, len(x), CHUNK):
        similarity = x[i : i + CHUNK] @ bank.T
        if excluding:
            similarity[:, exclude] = -np.inf
        out.append(1 - similarity.max(axis=1))
    return np.concatenate(out)


def prefix_knn_distances(features, bank: np.ndarray, prefixes: dict[Hashable, int]) -> dict[Hashable, np.ndarray]:
    """`knn_distance` to each prefix `bank[:rows]` of `prefixes` (name -> rows), from one product per chunk.

    A greedy coreset is prefix-consistent (its first k rows are the greedy coreset of size k,
    `scoring.coreset`), so one bank fitted at the largest ratio scores every smaller ratio: running
    maxima over the bank's columns, in order of prefix length.
    """
    x = unit_rows(features)
    ordered = sorted(prefixes.items(), key=lambda item: item[1])
    parts: dict[Hashable, list[np.ndarray]] = {name: [] for name, _ in ordered}
    for i in range(0, len(x), CHUNK):
        similarity = x[i : i + CHUNK] @ bank.T
        best, start = np.full(len(similarity), -np.inf, np.float32), 0
        for name, stop in ordered:
            if stop > start:
                best, start = np.maximum(best, similarity[:, start:stop].max(axis=1)), stop
            parts[name].append(1 - best)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def mahalanobis_distance(features, mean: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each feature row: `|(x - mean) @ whitener|` with `whitener @ whitener.T` = precision."""
    x = _rows(features)
    return np.concatenate([np.linalg.norm((x[i : i + CHUNK] - mean) @ whitener, axis=1)
                           for i in range(0, len(x), CHUNK)])


def fuse_views(grids: list[np.ndarray], view_stats: list[dict[str, float]]) -> np.ndarray:
    """Several views' `(h, w)` patch scores → the mean of their standardised scores on the last (finest) grid."""
    shape = np.asarray(grids[-1]).shape
    standard = [(np.asarray(g, np.float32) - np.float32(s["mean"])) / np.float32(s["std"]) for g, s in zip(grids, view_stats)]
    return np.mean([resize(g, shape) for g in standard], axis=0, dtype=np.float32)


def suppress_background(scores, foreground: np.ndarray) -> np.ndarray:
    """Cap scores outside `foreground` (dilated by one patch) at the median foreground score of the image.

    The median is the lower middle value (as `torch.median`), so it is always one of the scores.
    """
    scores = np.asarray(scores, np.float32)
    if not foreground.any():
        return scores
    inside = np.sort(scores[foreground])
    grown = maximum_filter(foreground, size=3, mode="constant", cval=False)
    return np.where(grown, scores, np.minimum(scores, inside[(len(inside) - 1) // 2]))
