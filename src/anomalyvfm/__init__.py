"""AnomalyVFM: industrial visual anomaly detection on DINOv2 patch features.

Train on good images only, then score new images, localise defects and decide pass/fail.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anomalyvfm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

from anomalyvfm.detector.detector import AnomalyDetector  # noqa: E402
from anomalyvfm.detector.settings import Runtime, Settings  # noqa: E402
from anomalyvfm.prediction import Prediction  # noqa: E402

__all__ = ["AnomalyDetector", "Settings", "Runtime", "Prediction", "__version__"]
