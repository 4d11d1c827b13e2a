"""AnomalyVFM: industrial visual anomaly detection on DINOv2 patch features.

Train on good images only, then score new images, localise defects and decide pass/fail.
"""
from anomalyvfm.prediction import Prediction
from anomalyvfm.version import __version__

__all__ = ["AnomalyDetector", "Settings", "Runtime", "Prediction", "__version__"]
_TORCH_SIDE = {"AnomalyDetector": "anomalyvfm.detector.detector", "Settings": "anomalyvfm.detector.settings",
               "Runtime": "anomalyvfm.detector.settings"}


def __getattr__(name: str):
    """The detector's classes on first use: they import torch, which the exported runtime
    (`anomalyvfm.deploy.runtime`) must not need."""
    if name in _TORCH_SIDE:
        import importlib

        return getattr(importlib.import_module(_TORCH_SIDE[name]), name)
    raise AttributeError(f"module 'anomalyvfm' has no attribute '{name}'")
