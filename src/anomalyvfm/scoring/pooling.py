"""Patch scores → one image score (numpy: shared with the torch-free runtime)."""
from __future__ import annotations

import numpy as np


def image_score(patch_scores, top_percent: float = 1.0) -> float:
    """Mean of the highest `top_percent` % of patch scores (at least one patch); numpy array or CPU tensor.

    A max would hang the decision on one noisy patch; a mean over all would drown a small defect.
    """
    flat = np.asarray(patch_scores, dtype=np.float32).reshape(-1)
    k = max(1, int(round(flat.size * top_percent / 100.0)))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean(dtype=np.float64))
