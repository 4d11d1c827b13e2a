"""The foreground mask of a patch-feature grid, in numpy: shared by the torch pipeline (`foreground`) and the
torch-free scoring head."""
from __future__ import annotations

import numpy as np


def foreground_mask(grid, mean: np.ndarray, component: np.ndarray, threshold: float) -> np.ndarray:
    """`(h, w)` bool: patches of an `(h, w, C)` grid on the foreground side of the first principal component."""
    return (np.asarray(grid, np.float32) - mean) @ component > threshold
