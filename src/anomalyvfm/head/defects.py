"""Known defects as evidence: a memory bank of real defect patches beside the normal one (numpy only).

A plant that has confirmed a few real defects should score the next defect *like them* higher than the
normal bank alone would. The normal scorer measures how far a patch is from normal (`d_n`: cosine distance
to the kNN bank, or Mahalanobis distance); the defect bank measures, in the *same* geometry, how far it is
from the nearest known defect patch (`d_d`: cosine distance to the defect rows, or Euclidean distance in the
Mahalanobis whitened space, where the rows are stored whitened). A patch's score becomes

    d_n + w · max(0, d_n - d_d)

— raised only where the patch is closer to a known defect than to anything normal, by how much closer. The
evidence is in the distance's own units, so everything downstream (view standardisation on validation, image
score, thresholds, maps) is unchanged; a patch nearer normal than any defect keeps its score exactly. That
is what keeps a model with defects from being much worse than without: normal patches are only raised
where they resemble a kept defect patch more than any normal patch. The weight `w` is a setting
(`Settings.defect_weight`), chosen by the fit on held-out labelled defects unless given (`detector.defects`);
a chosen 0 means the defects did not help there, and then no bank is kept at all.

The rows are stored as features (unit-norm for kNN); the Mahalanobis geometry is applied when a head is built
(`prepared_bank`), so a Gaussian that `anomalyvfm update` grows moves the defect rows with it.

Which patches are kept, per view (`defect_rows`):
* a patch the outline touches (its mask fraction, `data.resample.block_means`, is above zero) — or, for an
  image labelled without an outline, one of the top `top_percent` % of its patches (the patches its image
  score is made of: "somewhere in this image", multiple-instance style);
* and whose own normal distance is at least the view's *floor*: mean + 3 std of the view's validation patch
  scores (`Calibration.view_stats`). A patch inside an outline that scores like normal texture (an outline
  drawn generously, a faint defect) would otherwise raise every normal patch that looks like it.

The rows are stored with the head's arrays as `defects.view<i>.bank`, so the model directory, every exported
backbone form and the service carry them with no code of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from anomalyvfm.data.resample import block_means
from anomalyvfm.head.scores import ViewScores
from anomalyvfm.scoring.distances import CHUNK, knn_distance, unit_rows

FLOOR_SIGMA = 3.0  # kept defect patches score at least mean + FLOOR_SIGMA std of validation patches (per view)
DEFAULT_WEIGHT = 1.0  # a patch as near a known defect as it is far from normal counts double


def bank_key(view: int) -> str:
    return f"defects.view{view}.bank"


@dataclass(frozen=True)
class ScoredImage:
    """One image as a head without defects scored it (`scored.grids`: every view's normal distances), with
    every view's `(h, w, C)` features; for a labelled defect, its outline at the image's size (`None`:
    labelled without one, or a normal image)."""

    scored: ViewScores
    features: Sequence[np.ndarray]
    mask: np.ndarray | None = None


def defect_rows(defect: ScoredImage, view: int, floor: float, top_percent: float) -> np.ndarray:
    """Indices (into the view's flattened grid) of the patches of `defect` to keep as defect patches."""
    distances = np.asarray(defect.scored.grids[view], np.float32)
    if defect.mask is not None:
        candidate = block_means(defect.mask.astype(np.float32), distances.shape).reshape(-1) > 0
    else:
        flat = distances.reshape(-1)
        k = max(1, int(round(flat.size * top_percent / 100.0)))
        candidate = np.zeros(flat.size, bool)
        candidate[np.argpartition(flat, flat.size - k)[flat.size - k:]] = True
    return np.flatnonzero(candidate & (distances.reshape(-1) >= floor))


def defect_bank(arrays: dict[str, np.ndarray], scorer: str, defects: Sequence[ScoredImage],
                floors: Sequence[float], top_percent: float) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """The defect arrays to add to a head's `arrays` (one bank per view that keeps any patch), and the patches
    kept per image and view (kNN rows unit-norm, Mahalanobis rows as they are)."""
    banks: dict[str, np.ndarray] = {}
    kept = [[0] * len(floors) for _ in defects]
    for view, floor in enumerate(floors):
        rows = []
        for i, defect in enumerate(defects):
            index = defect_rows(defect, view, floor, top_percent)
            kept[i][view] = len(index)
            features = np.asarray(defect.features[view], np.float32)
            rows.append(features.reshape(-1, features.shape[-1])[index])
        patches = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        if len(patches):
            banks[bank_key(view)] = unit_rows(patches) if scorer == "knn" else patches
    return banks, kept


def prepared_bank(bank: np.ndarray, gaussian: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """A stored defect bank in the geometry its distances are taken in: as stored (kNN), or whitened by the
    view's Gaussian = (mean, whitener) (Mahalanobis)."""
    return bank if gaussian is None else whiten(bank, *gaussian)


def whiten(features, mean: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    """Rows in the Mahalanobis geometry: `(x - mean) @ whitener` (Euclidean distances there are Mahalanobis)."""
    x = np.asarray(features, np.float32).reshape(-1, np.shape(features)[-1])
    return np.concatenate([(x[i : i + CHUNK] - mean) @ whitener for i in range(0, len(x), CHUNK)] or
                          [np.zeros((0, whitener.shape[1]), np.float32)]).astype(np.float32)


def defect_distance(features, bank: np.ndarray, gaussian: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Distance of each feature row to its nearest row of a `prepared_bank`: cosine (kNN), or Euclidean in the
    whitened space of `gaussian` = (mean, whitener) (Mahalanobis)."""
    if gaussian is None:
        return knn_distance(features, bank)
    x = whiten(features, *gaussian)
    squared = (bank * bank).sum(1)
    out = [np.sqrt(np.maximum((x[i : i + CHUNK] ** 2).sum(1, keepdims=True) - 2 * x[i : i + CHUNK] @ bank.T
                              + squared, 0)).min(axis=1) for i in range(0, len(x), CHUNK)]
    return np.concatenate(out).astype(np.float32)


def with_defect_evidence(normal: np.ndarray, defect: np.ndarray, weight: float) -> np.ndarray:
    """Patch scores raised where a patch is closer to a known defect than to normal: `d_n + w·max(0, d_n - d_d)`."""
    return normal + np.float32(weight) * np.maximum(normal - defect, 0, dtype=np.float32)


class DefectEvidence:
    """A defect bank applied to views already scored against the normal model (`ScoredImage`): what the head
    computes for features, without their normal search again — for choosing the weight on held-out defects and
    for studies that score cached images many times. The same arithmetic, so the same scores."""

    def __init__(self, banks: dict[str, np.ndarray], gaussians: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> None:
        self.gaussians = list(gaussians)
        self.banks = {view: prepared_bank(banks[bank_key(view)], gaussian) for view, gaussian in enumerate(gaussians)
                      if bank_key(view) in banks}

    def nearest(self, image: ScoredImage) -> list[np.ndarray | None]:
        """Per view, each patch's distance to the nearest defect row (None: no bank for that view)."""
        return [None if view not in self.banks else
                defect_distance(features, self.banks[view], self.gaussians[view]).reshape(grid.shape)
                for view, (grid, features) in enumerate(zip(image.scored.grids, image.features))]

    @staticmethod
    def raised(image: ScoredImage, nearest: list[np.ndarray | None], weight: float) -> ViewScores:
        """The image's views with the evidence at `weight` (the very object when no patch is nearer a defect)."""
        if weight == 0 or all(d is None or not (d < g).any() for d, g in zip(nearest, image.scored.grids)):
            return image.scored
        return replace(image.scored, grids=[g if d is None else with_defect_evidence(g, d, weight)
                                            for g, d in zip(image.scored.grids, nearest)])
