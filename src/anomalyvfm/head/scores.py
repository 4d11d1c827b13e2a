"""One image's scores on their way to a decision: per view, fused, and in a score mode (numpy only).

Views: each view (a short side, or tiles) has its own scorer, and each scorer's distances have their own
scale and spread, so raw scores cannot be averaged. Each view's scores are standardised by the mean and
std of its patch scores on the validation (good) images, then averaged on the finest view's grid (where
small defects are sharpest). The foreground mask, when applied, caps background scores last.

Score modes of an adapted detector:

* ``distance`` — the fitted patch scorer (Mahalanobis / kNN); image score = mean of the top `top_percent` %
  patch scores (plus global evidence when the model uses it).
* ``head``     — the LoRA patch head's logits as patch scores; image score = the image head's logit.
* ``fusion``   — the sum of both after standardising each with its mean and std on validation/good
  images: the two scales are unrelated (distances vs logits), and standardising on normal data makes
  "one std above normal" count the same in both.

All three come from one backbone pass, so thresholds of every mode are fitted in a single validation
pass and a saved model can be re-scored with another mode without refitting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomalyvfm.scoring.moments import RunningMoments
from anomalyvfm.scoring.names import SCORE_MODES

HeadLogits = tuple[np.ndarray, float]  # a LoRA head's `(h, w)` patch logits and image logit


@dataclass
class ViewScores:
    """One image's patch-score grid per view (finest last), foreground mask, head scores and image-level evidence.

    Small: grids of patch scores, not features, so every validation image's can be kept while calibrating.
    """

    source: str
    grids: list[np.ndarray]
    foreground: np.ndarray | None
    processed_shape: tuple[int, int]
    image_shape: tuple[int, int]
    head: HeadLogits | None = None  # patch logits and image logit of the reference view
    global_distance: float | None = None  # reference view's distance to the training images (image_evidence)
    defect_evidence: float | None = None  # how near known defects its top patches are (`head.defects`)


@dataclass
class RawScores:
    """One image's fused distance grid and image score, with the head's (None without heads)."""

    distance: np.ndarray  # (h, w)
    distance_image: float
    head: np.ndarray | None = None  # (h, w) patch logits
    head_image: float | None = None


def view_statistics(scored: list[ViewScores]) -> list[dict[str, float]]:
    """Mean and std of each view's patch scores over `scored` (validation images)."""
    stats = []
    for grids in zip(*(item.grids for item in scored)):
        moments = RunningMoments()
        for grid in grids:
            moments.update(grid)
        stats.append({"mean": moments.mean, "std": max(moments.std, 1e-12)})
    return stats


def standardisation_stats(raws: list[RawScores]) -> dict[str, list[float]]:
    """[mean, std] of each score source over validation/good images (patches pooled over all images);
    score mode `fusion` puts distances and head logits on one scale with them."""
    values = {
        "distance_patch": np.concatenate([r.distance.reshape(-1) for r in raws]),
        "distance_image": np.array([r.distance_image for r in raws]),
        "head_patch": np.concatenate([r.head.reshape(-1) for r in raws]),
        "head_image": np.array([r.head_image for r in raws]),
    }
    return {key: [float(v.mean(dtype=np.float64)), float(v.std(dtype=np.float64))] for key, v in values.items()}


def _standardised(value, stats: list[float]):
    mean, std = stats
    return (value - mean) / max(std, 1e-12)


def combine(raw: RawScores, mode: str, stats: dict[str, list[float]]) -> tuple[np.ndarray, float]:
    """`(h, w)` patch scores and the image score of one image in score `mode`."""
    if mode == "distance":
        return raw.distance, raw.distance_image
    if raw.head is None:
        raise ValueError(f"score mode '{mode}' needs anomaly heads (a model fitted with --lora)")
    if mode == "head":
        return raw.head, raw.head_image
    if mode == "fusion":
        grid = _standardised(raw.distance, stats["distance_patch"]) + _standardised(raw.head, stats["head_patch"])
        score = _standardised(raw.distance_image, stats["distance_image"]) + _standardised(raw.head_image, stats["head_image"])
        return grid.astype(np.float32), float(score)
    raise ValueError(f"unknown score mode '{mode}' (choose from {', '.join(SCORE_MODES)})")
