"""Patch scores → full-size anomaly maps (post-processing), numpy only: shared with the torch-free runtime."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from anomalyvfm.data.resample import resize


def anomaly_map(patch_scores, processed_shape: tuple[int, int], image_shape: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Upsample an `(h, w)` patch-score grid (numpy array or CPU tensor) to the original image size as float32.

    Smoothing happens at the backbone's resolution, where `sigma` (pixels) has a fixed meaning relative
    to the patch size whatever the camera resolution; the final resize to the original size is bilinear.
    """
    up = resize(np.asarray(patch_scores, dtype=np.float32), tuple(processed_shape))
    if sigma > 0:
        up = gaussian_filter(up, sigma=sigma, mode="nearest")
    if tuple(processed_shape) != tuple(image_shape):
        up = resize(up, tuple(image_shape))
    return np.ascontiguousarray(up, dtype=np.float32)
