"""One entry point for every command that scores images: a bundle or a model directory → a predictor."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from anomalyvfm.deploy.bundle import is_bundle
from anomalyvfm.prediction import Predictor


def load_predictor(path: str | Path, **runtime: Any) -> Predictor:
    """A `BundlePredictor` for an exported bundle (no torch imported), else `AnomalyDetector.load`.

    `runtime` holds the `Runtime` options (device, batch_size, precision, score, max_aspect_ratio); a
    bundle's precision was fixed at export, so `precision` (the torch autocast dtype) applies to model
    directories only.
    """
    if is_bundle(path):
        from anomalyvfm.deploy.runtime import BundlePredictor

        return BundlePredictor(path, **{k: v for k, v in runtime.items() if k != "precision"})
    from anomalyvfm.detector.detector import AnomalyDetector

    return AnomalyDetector.load(path, **runtime)
