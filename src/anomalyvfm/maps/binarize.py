"""Per-image adaptive binarisation of an anomaly map (MEBin-style), on top of a global pixel threshold.

A global threshold must serve every image: set low enough to find faint defects it floods strong ones
with their smoothed halo, set high it misses faint ones. MEBin (main-element binarisation, AnomalyNCD,
CVPR 2025) instead picks each image's own threshold where the *structure* of the mask is most stable:
sweeping thresholds from the image's maximum down, the number of connected components stays constant
over the longest run of thresholds around the real defect regions and changes quickly in the noise.

Here the sweep runs between the global pixel threshold (a floor learned on normal images, so nothing
below it is ever flagged) and the image's maximum; the threshold chosen is the lowest of the longest
run of steps with the same non-zero component count. An image whose maximum does not pass the floor
gets an empty mask.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

STEPS = 32
BINARIZATIONS = ("global", "mebin")  # how predicted defect masks are cut from a map


def defect_mask(amap: np.ndarray, pixel_threshold: float, method: str = "global") -> np.ndarray:
    """The predicted defect pixels of one map, as every front end and metric cuts them: above the global
    pixel threshold, or (`mebin`) above this image's own most stable threshold at or over it. Compared in
    float64 (a float16 map against a Python float would round the threshold to float16), as the metrics do."""
    if method == "mebin":
        return adaptive_mask(amap, pixel_threshold)
    if method != "global":
        raise ValueError(f"binarisation must be one of {BINARIZATIONS}, got {method!r}")
    return amap > np.float64(pixel_threshold)


def adaptive_mask(amap: np.ndarray, floor: float, steps: int = STEPS) -> np.ndarray:
    """Boolean defect mask of one map: pixels above this image's most stable threshold (>= `floor`)."""
    top = float(amap.max())  # thresholds below are float64: exact against float16 or float32 maps
    if not top > floor:
        return np.zeros(amap.shape, dtype=bool)
    thresholds = np.linspace(top, floor, steps, endpoint=False)[1:]  # high to low, all above the floor
    counts = np.array([ndimage.label(amap > t)[1] for t in thresholds])
    best_start, best_length, start = 0, 0, 0
    for k in range(1, len(counts) + 1):
        if k == len(counts) or counts[k] != counts[start]:
            if counts[start] > 0 and k - start > best_length:
                best_start, best_length = start, k - start
            start = k
    return amap > thresholds[best_start + best_length - 1]
