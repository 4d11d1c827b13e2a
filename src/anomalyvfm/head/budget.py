"""Thresholds as false-alarm budgets, from normal samples stored with the thresholds (numpy only).

A model keeps, per score mode, each normal image's score and map maximum (`Thresholds.normal_samples`),
by where the image came from:

* "validation" — the validation images: the independent check of a budget threshold, never its sample;
* "out_of_fold" — the training images scored out of fold at fit time (`detector.out_of_fold`);
* "added" — good images added after the fit (`anomalyvfm calibrate`), e.g. the first shift's parts.

The budget sample is every non-validation image (`BUDGET_SOURCES`). Image scores and map maxima are one
number per image, so the record grows by two floats an image and thresholds can be re-estimated from
more images without the features — on a model directory or an exported bundle alike, without torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from anomalyvfm.errors import UserInputError
from anomalyvfm.head.calibration import Thresholds
from anomalyvfm.maps.thresholds import BudgetRule, NormalScores, ThresholdRule

BUDGET_SOURCES = ("out_of_fold", "added")
SOURCE_WORDS = {"out_of_fold": "training images out of fold", "added": "added good images"}


def sample(scores: list[float], maxima: list[float]) -> dict[str, list[float]]:
    """One source's record: image scores and per-image map maxima, in the same image order."""
    return {"image": [float(v) for v in scores], "map_max": [float(v) for v in maxima]}


def _pool(samples: dict[str, dict[str, list[float]]], sources: tuple[str, ...], key: str) -> NormalScores:
    pooled = NormalScores()
    values = [v for source in sources for v in samples.get(source, {}).get(key, [])]
    if values:
        pooled.update(np.asarray(values, np.float64))
    return pooled


def budget_thresholds(samples: dict[str, dict[str, list[float]]], rules: dict[str, ThresholdRule],
                      validation_stats: dict[str, float]) -> Thresholds:
    """Image threshold from the budget sample's image scores, pixel threshold from its per-image map maxima
    (so the pixel budget counts good images with any outlined pixel), each checked on the validation record."""
    counts = {s: len(samples.get(s, {}).get("image", [])) for s in BUDGET_SOURCES}
    if not any(counts.values()):
        raise UserInputError("the budget threshold rule needs normal images beyond validation: out-of-fold "
                             "training scores (a local fit) or good images added with anomalyvfm calibrate")
    origin = " + ".join(f"{n} {SOURCE_WORDS[s]}" for s, n in counts.items() if n)
    evidence: dict[str, dict[str, Any]] = {}
    thresholds = []
    for level, key, what in (("image", "image", "normal image scores"),
                             ("pixel", "map_max", "per-image maxima of normal maps")):
        check = _pool(samples, ("validation",), key)
        decision = rules[level].decide(_pool(samples, BUDGET_SOURCES, key), f"{what} ({origin})", check)
        evidence[level] = decision.evidence
        thresholds.append(decision.threshold)
    return Thresholds(thresholds[0], thresholds[1], validation_stats, evidence, samples)


def with_added(thresholds: Thresholds, scores: list[float], maxima: list[float]) -> dict[str, dict[str, list[float]]]:
    """`thresholds`' normal samples with good images' scores and map maxima appended to the "added" source."""
    samples = dict(thresholds.normal_samples)
    before = samples.get("added", sample([], []))
    samples["added"] = sample([*before["image"], *scores], [*before["map_max"], *maxima])
    return samples


def add_good_images(thresholds: Thresholds, scores: list[float], maxima: list[float], rate: float) -> Thresholds:
    """`thresholds` re-estimated as budgets at false-alarm `rate` (both levels) after adding good images'
    scores and map maxima to its normal samples (to any added before): `anomalyvfm calibrate`."""
    samples = with_added(thresholds, scores, maxima)
    rule = BudgetRule(rate)
    return budget_thresholds(samples, {"image": rule, "pixel": rule}, thresholds.validation_stats)
