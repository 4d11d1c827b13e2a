"""The fit workflow of a category: its train split → a detector, thresholds from its validation split.

The path of `anomalyvfm fit`, of every benchmark variant and of the Ray fit (which plugs in its own
detector factory): one place that decides which images a fit sees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from anomalyvfm.data import evenly_spaced, load_dataset
from anomalyvfm.detector.defects import DefectSet
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.detector.settings import Runtime, Settings


@dataclass(frozen=True)
class Variant:
    """One named way to fit: the settings, how to run them, and how many training images to use."""

    name: str
    settings: Settings
    runtime: Runtime
    max_train_images: int | None = None
    calibration_defects: Path | None = None  # labelled defects the thresholds are also set from
    defects: DefectSet | None = None  # labelled defects learnt as evidence in the score


def fit_category(data: str | Path, category: str | None, layout: str, variant: Variant,
                 make_detector: Callable[[Settings, Runtime], AnomalyDetector] = AnomalyDetector
                 ) -> tuple[AnomalyDetector, float]:
    """Fit a detector on a category's train split, thresholds on its validation split; return it and seconds.

    `make_detector` builds the unfitted detector (another engine, e.g. Ray, plugs in its own here).
    """
    dataset = load_dataset(data, category, layout, variant.settings.seed)
    start = time.perf_counter()
    detector = make_detector(variant.settings, variant.runtime)
    train = [s.path for s in dataset.split("train")]
    if variant.max_train_images:
        train = evenly_spaced(train, variant.max_train_images)
    detector.fit(train, [s.path for s in dataset.split("validation")], calibration_defects=variant.calibration_defects,
                 defects=variant.defects)
    return detector, time.perf_counter() - start
