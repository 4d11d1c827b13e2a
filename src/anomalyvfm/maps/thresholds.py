"""Thresholds from defect-free validation scores, accumulated without keeping the maps in memory."""
from __future__ import annotations

from anomalyvfm.scoring.moments import RunningMoments


def sigma_threshold(moments: RunningMoments, num_sigma: float = 3.0) -> float:
    """mean + `num_sigma`·std of scores on defect-free validation data (the MVTec AD 2 baseline rule)."""
    return moments.mean + num_sigma * moments.std
