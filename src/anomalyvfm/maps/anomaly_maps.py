"""Patch scores → full-size anomaly maps (post-processing)."""
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
