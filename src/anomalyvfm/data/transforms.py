"""Pre-processing for the backbone: aspect-preserving resize to patch multiples, ImageNet normalisation.

The prototype squashed every image into a square, which stretched 4:1 sheet metal by a factor of four
and blurred thin defects. Here the short side goes to `image_size` and each side is then rounded to the
nearest multiple of the patch size. Rounding (rather than cropping) keeps every original pixel covered
by a patch, so maps map back onto the full image; the aspect ratio changes by at most half a patch
(≤ 1.6 % at 448 px).

Resizing is numpy (`resample`), so the torch pipeline and the torch-free runtime share it; an exported
backbone graph applies the ImageNet normalisation itself and takes `resized_unit` output directly.
"""
from __future__ import annotations

import numpy as np

from anomalyvfm.data.resample import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def scaled_size(height: int, width: int, scale: float, patch_size: int) -> tuple[int, int]:
    """Size (H, W) of an image resized by `scale`, each side rounded to a multiple of `patch_size`."""
    return (
        max(patch_size, round(height * scale / patch_size) * patch_size),
        max(patch_size, round(width * scale / patch_size) * patch_size),
    )


def processed_size(height: int, width: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """Size (H, W) the backbone sees: short side ≈ `image_size`, both sides multiples of `patch_size`."""
    return scaled_size(height, width, image_size / min(height, width), patch_size)


def resized_unit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`HxWx3 uint8` → `3xHxW float32` in [0, 1], resized (antialiased bilinear) to `size`.

    Channels are converted and resized one at a time (the resize is per channel, so the values are the
    same): a 36 MP image then needs one 144 MB float plane at a time instead of 432 MB for all three.
    """
    out = np.empty((3, *size), np.float32)
    for c in range(3):
        out[c] = resize(image[..., c].astype(np.float32) / np.float32(255.0), size, antialias=True)
    return out


def normalise(unit: np.ndarray) -> np.ndarray:
    """ImageNet normalisation of a `3xHxW` [0, 1] array."""
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return (unit - mean) / std


def to_tensor(image: np.ndarray, size: tuple[int, int]):
    """`HxWx3 uint8` → normalised `3xHxW float32` torch tensor resized (antialiased) to `size`."""
    import torch  # the torch-free runtime uses `resized_unit` only

    return torch.from_numpy(normalise(resized_unit(image, size)))
