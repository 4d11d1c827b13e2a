"""Bilinear resizing in numpy, shared by the torch pipeline and the torch-free runtime.

One implementation serves both paths, so an exported bundle pre- and post-processes exactly as the model
it came from. Resizing is separable: each axis is a sparse matrix of interpolation weights (2 taps
upsampling; with `antialias`, a triangle filter as wide as the scale when downsampling, as PIL and
`torch.nn.functional.interpolate(..., antialias=True)` do). The weights follow torch's `align_corners=False`
convention but are computed in float64; torch computes them in float32, so the two differ by about 2e-5
of the value range, which is float32 noise of torch's weights rather than a difference of method.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import sparse


@lru_cache(maxsize=256)
def bilinear_weights(n_in: int, n_out: int, antialias: bool) -> sparse.csr_matrix:
    """`(n_out, n_in)` float32 weights: output sample i is row i times the input samples."""
    scale = n_in / n_out
    centre = scale * (np.arange(n_out) + 0.5)
    if antialias and scale > 1:  # triangle filter stretched to the scale, renormalised at the borders
        start = np.maximum((centre - scale + 0.5).astype(np.int64), 0)
        stop = np.minimum((centre + scale + 0.5).astype(np.int64), n_in)
        taps = int((stop - start).max())
        cols = start[:, None] + np.arange(taps)
        weights = np.maximum(0.0, 1 - np.abs((cols - centre[:, None] + 0.5) / scale))
        weights[cols >= stop[:, None]] = 0.0
        weights /= weights.sum(1, keepdims=True)
        cols = np.minimum(cols, n_in - 1)
    else:  # plain 2-tap bilinear, source clamped at the first sample
        source = np.maximum(centre - 0.5, 0.0)
        low = np.minimum(source.astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        frac = source - low
        cols, weights = np.stack([low, high], 1), np.stack([1 - frac, frac], 1)
    rows = np.repeat(np.arange(n_out), cols.shape[1])
    matrix = sparse.csr_matrix((weights.ravel(), (rows, cols.ravel())), shape=(n_out, n_in), dtype=np.float64)
    return matrix.astype(np.float32)


def resize(array: np.ndarray, size: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Resize the first two axes of a float `(H, W, ...)` array to `size` = (height, width), as float32."""
    out = np.asarray(array, dtype=np.float32)
    (height, width), rest = out.shape[:2], out.shape[2:]
    if size[0] != height:
        out = bilinear_weights(height, size[0], antialias) @ out.reshape(height, -1)
        out = out.reshape(size[0], width, *rest)
    if size[1] != width:
        moved = np.moveaxis(out, 1, 0).reshape(width, -1)
        out = np.moveaxis((bilinear_weights(width, size[1], antialias) @ moved).reshape(size[1], size[0], *rest), 0, 1)
    return np.ascontiguousarray(out)


def block_means(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Mean of `array` `(H, W)` over each cell of a `size` grid, cells as in adaptive average pooling
    (rows `floor(i·H/h)` to `ceil((i+1)·H/h)`): the fraction of a mask inside each feature patch, without torch."""
    height, width = array.shape
    total = np.zeros((height + 1, width + 1))
    total[1:, 1:] = np.asarray(array, dtype=np.float64).cumsum(0).cumsum(1)
    rows = [np.arange(n) * length // n for n, length in ((size[0], height), (size[1], width))]
    ends = [-(-(np.arange(n) + 1) * length // n) for n, length in ((size[0], height), (size[1], width))]
    (r0, c0), (r1, c1) = (np.ix_(rows[0], rows[1])), (np.ix_(ends[0], ends[1]))
    sums = total[r1, c1] - total[r0, c1] - total[r1, c0] + total[r0, c0]
    return (sums / ((ends[0] - rows[0])[:, None] * (ends[1] - rows[1])[None, :])).astype(np.float32)
