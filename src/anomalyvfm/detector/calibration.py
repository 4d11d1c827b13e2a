"""Calibration: every statistic a fitted detector takes from its validation (defect-free) images.

Held in one place and stored once per score mode: the image and pixel thresholds of each mode with the
validation statistics behind them, the per-view score statistics that let several views be fused, the
statistics that put distances and head logits on one scale (score mode `fusion`), and the foreground
decision. Nothing here is ever computed from test images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from anomalyvfm.data.images import ImageLike
from anomalyvfm.declare import from_dict
from anomalyvfm.errors import UserInputError
from anomalyvfm.features.extraction import FailedImage
from anomalyvfm.features.foreground import looks_like_object, mask_stats
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.maps.thresholds import NormalScores, ThresholdRule
from anomalyvfm.scoring.image_evidence import evidence_stats
from anomalyvfm.scoring.names import SCORE_MODES
from anomalyvfm.scoring.score_modes import RawScores, combine, standardisation_stats
from anomalyvfm.scoring.views import view_statistics


@dataclass
class Thresholds:
    """One score mode's decision thresholds and the validation statistics they come from."""

    image_threshold: float
    pixel_threshold: float
    validation_stats: dict[str, float]
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)  # per level: the rule and its figures


@dataclass
class Calibration:
    """What fit learned from validation images; `mode` is the score mode used unless the runtime picks another."""

    mode: str
    modes: dict[str, Thresholds]
    head_stats: dict[str, list[float]] = field(default_factory=dict)  # distance/head mean and std (mode fusion)
    view_stats: list[dict[str, float]] = field(default_factory=list)  # per view: patch-score mean and std
    foreground: dict[str, Any] = field(default_factory=dict)  # mask coverage figures and whether it is applied
    image_stats: dict[str, list[float]] = field(default_factory=dict)  # patch/global image evidence: mean, std

    def thresholds(self, mode: str | None = None) -> Thresholds:
        """Thresholds of `mode` (default: the fitted mode); a one-line error if this model has no such mode."""
        mode = mode or self.mode
        if mode not in self.modes:
            raise UserInputError(f"this model has no '{mode}' scores (it has: {', '.join(self.modes)}); "
                                 "head and fusion need fit --lora")
        return self.modes[mode]

    @property
    def suppress_background(self) -> bool:
        return bool(self.foreground.get("active"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Calibration":
        calibration = from_dict(cls, data, where)
        calibration.modes = {mode: from_dict(Thresholds, t, f"{where} (thresholds of '{mode}')")
                             for mode, t in calibration.modes.items()}
        for mode, t in calibration.modes.items():
            if mode not in SCORE_MODES or not all(isinstance(v, (int, float)) for v in (t.image_threshold, t.pixel_threshold)):
                raise UserInputError(f"{where}: thresholds of score mode '{mode}' are not numbers")
        calibration.thresholds()  # the fitted mode must have thresholds
        return calibration


def calibrate(pipeline, images: Sequence[ImageLike], mode: str, progress: bool) -> Calibration:
    """Fit the calibration of a fitted `pipeline` (a `detector.pipeline.Pipeline`) from one pass over `images`.

    View statistics and the foreground decision come first, because the fused scores every threshold is
    taken from depend on them.
    """
    if not images:
        raise UserInputError("no validation images: thresholds need defect-free validation images")
    scored = []
    for items in pipeline.view_features(images, "thresholds (validation)" if progress else None):
        if isinstance(items, FailedImage):
            raise UserInputError(f"validation image unreadable: {items.error}")
        scored.append(pipeline.score_views(items))
    calibration = Calibration(mode, {}, view_stats=view_statistics(scored))
    if pipeline.foreground_model:
        stats = mask_stats(pipeline.foreground_model, [item.foreground for item in scored])
        active = pipeline.settings.foreground == "on" or looks_like_object(stats)
        calibration.foreground = {**stats, "active": active}
    if pipeline.image_bank is not None:  # before any fused image score: those are standardised by it
        patch = [pipeline.raw(item, calibration, "patch").distance_image for item in scored]
        calibration.image_stats = evidence_stats(patch, [item.global_distance for item in scored])
    raws = [pipeline.raw(item, calibration) for item in scored]
    shapes = [(item.processed_shape, item.image_shape) for item in scored]
    if pipeline.heads is not None:
        calibration.head_stats = standardisation_stats(raws)
    modes = SCORE_MODES if pipeline.heads is not None else ("distance",)
    sigma, rules = pipeline.settings.sigma, pipeline.settings.threshold_rules()
    calibration.modes = {m: _mode_thresholds(raws, shapes, m, calibration.head_stats, sigma, rules) for m in modes}
    calibration.thresholds()  # fail now, not at the first prediction, if the asked mode is not available
    return calibration


def _mode_thresholds(raws: list[RawScores], shapes: list[tuple], mode: str, head_stats: dict, sigma: float,
                     rules: dict[str, ThresholdRule]) -> Thresholds:
    """One mode's image and pixel thresholds, each by its level's rule, from the validation images."""
    pixels, scores = NormalScores(), NormalScores()
    for raw, (processed_shape, image_shape) in zip(raws, shapes):
        grid, score = combine(raw, mode, head_stats)
        pixels.update(anomaly_map(grid, processed_shape, image_shape, sigma))
        scores.update(np.array([score]))
    return thresholds_from(scores, pixels, rules)


def thresholds_from(scores: NormalScores, pixels: NormalScores, rules: dict[str, ThresholdRule]) -> Thresholds:
    """Thresholds from validation image scores and map pixels (also used by benchmarks on cached maps)."""
    image = rules["image"].decide(scores, "defect-free validation image scores")
    pixel = rules["pixel"].decide(pixels, "defect-free validation map pixels")
    s, p = scores.moments, pixels.moments
    stats = {"images": s.n, "image_score_mean": s.mean, "image_score_std": s.std,
             "pixel_score_mean": p.mean, "pixel_score_std": p.std}
    return Thresholds(image.threshold, pixel.threshold, stats, {"image": image.evidence, "pixel": pixel.evidence})
