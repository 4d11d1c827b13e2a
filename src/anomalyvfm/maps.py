"""Patch scores → full-size anomaly maps, image scores and pass/fail decisions (post-processing)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def anomaly_map(
    patch_scores: torch.Tensor, processed_shape: tuple[int, int], image_shape: tuple[int, int], sigma: float = 4.0
) -> np.ndarray:
    """Upsample an `(h, w)` patch-score grid to the original image size as float32.

    Smoothing happens at the backbone's resolution, where `sigma` (pixels) has a fixed meaning relative
    to the patch size whatever the camera resolution; the final resize to the original size is bilinear.
    """
    grid = patch_scores.float()[None, None]
    up = F.interpolate(grid, size=processed_shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    if sigma > 0:
        up = gaussian_filter(up, sigma=sigma, mode="nearest")
    if tuple(processed_shape) != tuple(image_shape):
        up = F.interpolate(torch.from_numpy(up)[None, None], size=image_shape, mode="bilinear", align_corners=False)
        up = up[0, 0].numpy()
    return np.ascontiguousarray(up, dtype=np.float32)


def image_score(patch_scores: torch.Tensor, top_percent: float = 1.0) -> float:
    """Mean of the highest `top_percent` % of patch scores (at least one patch).

    A max would hang the decision on one noisy patch; a mean over all would drown a small defect.
    """
    flat = patch_scores.reshape(-1).float()
    k = max(1, int(round(flat.numel() * top_percent / 100.0)))
    return float(flat.topk(k).values.mean())


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


def sigma_threshold(moments: RunningMoments, num_sigma: float = 3.0) -> float:
    """mean + `num_sigma`·std of scores on defect-free validation data (the MVTec AD 2 baseline rule)."""
    return moments.mean + num_sigma * moments.std
