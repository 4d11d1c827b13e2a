"""`Prediction`: the result of scoring one image, shared by the torch detector and the exported runtime.

Kept free of torch so that the runtime (`anomalyvfm.deploy.runtime`) can return the same type.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prediction:
    """Result for one image. On a read failure `error` is set and the other fields are empty."""

    source: str
    score: float = float("nan")
    is_anomalous: bool = False
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None
