"""Score modes of an adapted detector: distance, head or their fusion.

* ``distance`` — the fitted patch scorer (Mahalanobis / kNN) on the adapted features; image score =
  mean of the top `top_percent` % patch scores, exactly as for a frozen backbone.
* ``head``     — the patch head's logits as patch scores; image score = the image head's logit, which
  was trained for that decision (attention-pooled over suspicious patches, see `heads`).
* ``fusion``   — the sum of both after standardising each with its mean and std on validation/good
  images: patch level for the map, image level for the image score. The two scales are unrelated
  (distances vs logits), and standardising on normal data makes "one std above normal" count the same
  in both.

All three come from one backbone pass (`raw_scores`), so thresholds of every mode are fitted in a
single validation pass and a saved model can be re-scored with another mode without refitting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from anomalyvfm.scoring.names import SCORE_MODES
from anomalyvfm.adaptation.heads import AnomalyHeads
from anomalyvfm.scoring.pooling import image_score



@dataclass
class RawScores:
    """One image's scores from every available source (head fields are None without heads)."""

    distance: torch.Tensor  # (h, w)
    distance_image: float
    head: torch.Tensor | None = None  # (h, w) patch logits
    head_image: float | None = None


def head_scores(heads: AnomalyHeads, features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`(h, w)` patch logits and the image logit of one image's `(h, w, C)` features (the reference view's)."""
    with torch.inference_mode():
        logits, image_logit = heads(features[None].float())
    return logits[0], float(image_logit[0])


def raw_scores(distance: torch.Tensor, head: tuple[torch.Tensor, float] | None, top_percent: float) -> RawScores:
    """Bundle an image's `(h, w)` distance scores with its head scores (`head_scores`, None without heads)."""
    raw = RawScores(distance, image_score(distance, top_percent))
    if head is not None:
        raw.head, raw.head_image = head
    return raw


def standardisation_stats(raws: list[RawScores]) -> dict[str, list[float]]:
    """[mean, std] of each score source over validation/good images (patches pooled over all images);
    score mode `fusion` puts distances and head logits on one scale with them."""
    values = {
        "distance_patch": torch.cat([r.distance.reshape(-1) for r in raws]),
        "distance_image": torch.tensor([r.distance_image for r in raws]),
        "head_patch": torch.cat([r.head.reshape(-1) for r in raws]),
        "head_image": torch.tensor([r.head_image for r in raws]),
    }
    return {key: [float(v.double().mean()), float(v.double().std(correction=0))] for key, v in values.items()}


def _standardised(value, stats: list[float]):
    mean, std = stats
    return (value - mean) / max(std, 1e-12)


def combine(raw: RawScores, mode: str, stats: dict[str, list[float]]) -> tuple[torch.Tensor, float]:
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
        return grid, float(score)
    raise ValueError(f"unknown score mode '{mode}' (choose from {', '.join(SCORE_MODES)})")
