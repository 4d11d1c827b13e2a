"""Fitting the calibration (`head.calibration.Calibration`) of a fitted pipeline from validation images.

One pass over defect-free validation images through the pipeline's scoring head gives every statistic the
decisions need; nothing here is ever computed from test images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from anomalyvfm.data.images import ImageLike
from anomalyvfm.errors import UserInputError
from anomalyvfm.features.extraction import FailedImage
from anomalyvfm.features.foreground import looks_like_object, mask_stats
from anomalyvfm.head.budget import budget_thresholds, sample
from anomalyvfm.head.calibration import Calibration, Thresholds
from anomalyvfm.head.scores import RawScores, ViewScores, combine, standardisation_stats, view_statistics
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.maps.thresholds import NormalScores, ThresholdRule
from anomalyvfm.scoring.image_evidence import evidence_stats
from anomalyvfm.scoring.names import SCORE_MODES


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
    return calibrate_scored(pipeline, scored, mode)


def calibrate_scored(pipeline, scored: list[ViewScores], mode: str) -> Calibration:
    """`calibrate` from the validation images' already scored views (a study re-scores cached features)."""
    calibration = Calibration(mode, {}, view_stats=view_statistics(scored))
    head = pipeline.head
    if head.has_foreground:
        stats = mask_stats(head.separability, [torch.from_numpy(item.foreground) for item in scored])
        active = pipeline.settings.foreground == "on" or looks_like_object(stats)
        calibration.foreground = {**stats, "active": active}
    if head.image_terms:  # before any fused image score: those are standardised by it
        patch = [head.fuse(item, calibration, "patch").distance_image for item in scored]
        values = {"global": [item.global_distance for item in scored], "defects": [item.defect_evidence for item in scored]}
        calibration.image_stats = evidence_stats(patch, {name: values[name] for name in head.image_terms})
    raws = [head.fuse(item, calibration) for item in scored]
    shapes = [(item.processed_shape, item.image_shape) for item in scored]
    if pipeline.heads is not None:
        calibration.head_stats = standardisation_stats(raws)
    modes = SCORE_MODES if pipeline.heads is not None else ("distance",)
    sigma, rules = pipeline.settings.sigma, pipeline.settings.threshold_rules()
    out_of_fold = None
    if pipeline.out_of_fold is not None:  # training images scored out of fold (only the distance mode has them)
        out_of_fold = ([pipeline.head.fuse(item, calibration) for item in pipeline.out_of_fold],
                       [(item.processed_shape, item.image_shape) for item in pipeline.out_of_fold])
    calibration.modes = {m: _mode_thresholds(raws, shapes, m, calibration.head_stats, sigma, rules,
                                             out_of_fold if m == "distance" else None) for m in modes}
    calibration.thresholds()  # fail now, not at the first prediction, if the asked mode is not available
    return calibration


def _mode_thresholds(raws: list[RawScores], shapes: list[tuple], mode: str, head_stats: dict, sigma: float,
                     rules: dict[str, ThresholdRule],
                     out_of_fold: tuple[list[RawScores], list[tuple]] | None = None) -> Thresholds:
    """One mode's image and pixel thresholds, each by its level's rule: from the validation images, or,
    for a rule whose sample is the normal images beyond validation (budget), from the `out_of_fold`
    training images with validation as the check. Each image's score and map maximum are kept."""
    pixels, scores = NormalScores(), NormalScores()
    records = {}
    for source, (items, item_shapes) in (("validation", (raws, shapes)), ("out_of_fold", out_of_fold or ([], []))):
        image_scores, maxima = [], []
        for raw, (processed_shape, image_shape) in zip(items, item_shapes):
            grid, score = combine(raw, mode, head_stats)
            amap = anomaly_map(grid, processed_shape, image_shape, sigma)
            if source == "validation":
                pixels.update(amap)
                scores.update(np.array([score]))
            image_scores.append(score)
            maxima.append(float(amap.max()))
        if items:
            records[source] = sample(image_scores, maxima)
    maxima = records.get("validation", {}).get("map_max", [])
    if rules["image"].sample != "validation":
        return budget_thresholds(records, rules, validation_stats(scores, pixels, maxima))
    thresholds = thresholds_from(scores, pixels, rules, maxima)
    thresholds.normal_samples = records
    return thresholds


def thresholds_from(scores: NormalScores, pixels: NormalScores, rules: dict[str, ThresholdRule],
                    maxima: Sequence[float] = ()) -> Thresholds:
    """Thresholds from validation image scores and map pixels (also used by benchmarks on cached maps);
    `maxima`: each validation map's maximum."""
    image = rules["image"].decide(scores, "defect-free validation image scores")
    pixel = rules["pixel"].decide(pixels, "defect-free validation map pixels")
    return Thresholds(image.threshold, pixel.threshold, validation_stats(scores, pixels, maxima),
                      {"image": image.evidence, "pixel": pixel.evidence})


def validation_stats(scores: NormalScores, pixels: NormalScores, maxima: Sequence[float] = ()) -> dict[str, float]:
    """Mean and std of validation image scores and map pixels (displays scale maps by them), and the median of
    the maps' maxima (the level the `mebin-grown` cut grows regions down to: `maps.binarize`)."""
    s, p = scores.moments, pixels.moments
    return {"images": s.n, "image_score_mean": s.mean, "image_score_std": s.std,
            "pixel_score_mean": p.mean, "pixel_score_std": p.std,
            **({"map_max_median": float(np.median(maxima))} if len(maxima) else {})}
