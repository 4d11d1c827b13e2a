"""Choosing the image evidence (`Settings.image_evidence`: patch, or patch + global) on validation +
synthetic anomalies, from a fitted pipeline.

Test labels must never steer a setting, so the choice is made as `--auto` makes its others
(`detector.candidates`): good validation images against synthetic anomalies made on them — the local
stages (which the patch evidence must not lose) and the global ones (colour shift, missing part,
duplicated part: what the global evidence is for). One pass of the fitted pipeline scores every image
both ways (the global distance needs no extra backbone pass); the evidence with the higher image AUROC
wins, a tie goes to "patch" (the cheaper one).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from anomalyvfm.data import evenly_spaced, load_rgb
from anomalyvfm.data.images import ImageLike
from anomalyvfm.data.synthesis import GLOBAL_STAGES, STAGES, SynthesisConfig
from anomalyvfm.detector.calibration import calibrate
from anomalyvfm.detector.candidates import with_synthetic_anomalies
from anomalyvfm import metrics as M
from anomalyvfm.features.extraction import FailedImage
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.scoring.image_evidence import fuse_image_evidence
from anomalyvfm.scoring.names import IMAGE_EVIDENCE

CHOICE_VALIDATION = 24  # good validation images used (as `--auto`); twice as many synthetic anomalies are made
CHOICE_STAGES = SynthesisConfig(stages=STAGES + GLOBAL_STAGES, weights=(1.0,) * len(STAGES + GLOBAL_STAGES))


def evidence_scores(pipeline, calibration, images: Sequence[ImageLike], progress: str | None = None
                    ) -> tuple[list[float], list[float]]:
    """Patch image scores and global distances of `images` from a fitted, calibrated pipeline (one pass)."""
    patch, distance = [], []
    for items in pipeline.view_features(images, progress):
        if isinstance(items, FailedImage):
            raise ValueError(f"evidence images must be readable: {items.error}")
        scored = pipeline.score_views(items)
        patch.append(pipeline.head.fuse(scored, calibration, "patch").distance_image)
        distance.append(scored.global_distance)
    return patch, distance


def settle_image_evidence(pipeline, calibration: Calibration, validation: Sequence[ImageLike], mode: str,
                          progress: bool) -> tuple[Calibration, dict]:
    """Choose the image evidence of a fitted, calibrated pipeline (`--image-evidence auto`) and configure it;
    the calibration is taken again only if the choice differs from the evidence it was taken with."""
    choice = choose_image_evidence(pipeline, calibration, validation, pipeline.settings.seed, progress)
    scored_with = pipeline.head.config.image_evidence
    pipeline.configure(image_evidence=choice["chosen"])
    if choice["chosen"] != scored_with:
        calibration = calibrate(pipeline, validation, mode, progress)
    return calibration, choice


def choose_image_evidence(pipeline, calibration, validation: Sequence[ImageLike], seed: int,
                          progress: bool = False) -> dict:
    """Validation image AUROC of each evidence (all synthetic anomalies, and the global ones alone); the choice."""
    good = [load_rgb(image) for image in evenly_spaced(list(validation), CHOICE_VALIDATION)]
    images, masks = with_synthetic_anomalies(good, seed, CHOICE_STAGES)
    patch, distance = evidence_scores(pipeline, calibration, images, "image evidence (validation)" if progress else None)
    labels = np.array([m is not None for m in masks], int)
    per_stage = max(1, len(good) // 3)  # synthetic images come stage by stage, in CHOICE_STAGES order
    first_global = len(good) + per_stage * CHOICE_STAGES.stages.index(GLOBAL_STAGES[0])
    global_only = np.r_[:len(good), first_global:len(images)]
    figures = {}
    for evidence in IMAGE_EVIDENCE:
        scores = np.array([fuse_image_evidence(p, {"global": d}, calibration.image_stats, evidence) for p, d in zip(patch, distance)])
        figures[evidence] = {"val_image_auroc": M.image_auroc(labels, scores),
                             "val_image_auroc_global_anomalies": M.image_auroc(labels[global_only], scores[global_only])}
    z = [(np.array(v) - mean) / max(std, 1e-12) for v, (mean, std) in
         ((patch, calibration.image_stats["patch"]), (distance, calibration.image_stats["global"]))]
    figures["patch+global"]["val_image_auroc_max_fusion"] = M.image_auroc(labels, np.maximum(*z))  # sum's alternative
    chosen = max(IMAGE_EVIDENCE, key=lambda e: (figures[e]["val_image_auroc"], -IMAGE_EVIDENCE.index(e)))
    return {"chosen": chosen, "rule": "max validation image AUROC, synthetic local + global anomalies; ties: patch",
            "validation_images": len(good), "synthetic_images": len(images) - len(good), "figures": figures}
