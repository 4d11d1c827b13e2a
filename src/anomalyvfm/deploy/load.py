"""One entry point for every command that scores images: a bundle or a model directory → a predictor."""
from __future__ import annotations

from pathlib import Path

from anomalyvfm.deploy.bundle import is_bundle


def load_predictor(path: str | Path, device: str = "cpu", batch_size: int | None = None,
                   precision: str | None = None, score: str | None = None):
    """A `BundlePredictor` for an exported bundle (no torch imported), else `AnomalyDetector.load`.

    A bundle's precision was fixed at export, so `precision` (the torch autocast dtype) applies to
    model directories only.
    """
    if is_bundle(path):
        from anomalyvfm.deploy.runtime import BundlePredictor

        return BundlePredictor(path, batch_size=batch_size, score=score, device=device)
    from anomalyvfm.detector.detector import AnomalyDetector

    overrides = {key: value for key, value in (("device", device), ("batch_size", batch_size),
                                               ("precision", precision)) if value is not None}
    return AnomalyDetector.load(path, score=score, **overrides)
