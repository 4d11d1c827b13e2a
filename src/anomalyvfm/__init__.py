"""AnomalyVFM: industrial visual anomaly detection on DINOv2 patch features.

Train on good images only, then score new images, localise defects and decide pass/fail.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anomalyvfm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

from anomalyvfm.prediction import Prediction  # noqa: E402

__all__ = ["AnomalyDetector", "DetectorConfig", "Prediction", "__version__"]


def __getattr__(name: str):
    """`AnomalyDetector` and `DetectorConfig` on first use: they import torch, which the exported runtime
    (`anomalyvfm.deploy.runtime`) must not need."""
    if name in ("AnomalyDetector", "DetectorConfig"):
        from anomalyvfm.detector import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'anomalyvfm' has no attribute '{name}'")
