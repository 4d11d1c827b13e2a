"""AnomalyVFM: industrial visual anomaly detection on DINOv2 patch features.

Train on good images only, then score new images, localise defects and decide pass/fail.
"""
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.prediction import Prediction
from anomalyvfm.version import __version__

__all__ = ["AnomalyDetector", "Settings", "Runtime", "Prediction", "__version__"]
