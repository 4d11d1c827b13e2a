"""Streaming moments of scores: statistics over many images without holding their score grids."""
from __future__ import annotations

import numpy as np


class RunningMoments:
    """Streaming mean and standard deviation (float64), so thresholds never need all maps in memory."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.n += v.size
        self.total += float(v.sum())
        self.total_sq += float(np.square(v).sum())

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.total_sq / self.n - self.mean**2, 0.0)))
