"""Pre-processing for the backbone: aspect-preserving resize to patch multiples, ImageNet normalisation.

The prototype squashed every image into a square, which stretched 4:1 sheet metal by a factor of four
and blurred thin defects. Here the short side goes to `image_size` and each side is then rounded to the
nearest multiple of the patch size. Rounding (rather than cropping) keeps every original pixel covered
by a patch, so maps map back onto the full image; the aspect ratio changes by at most half a patch
(≤ 1.6 % at 448 px).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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


def to_tensor(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """`HxWx3 uint8` → normalised `3xHxW float32` tensor resized (antialiased) to `size`.

    Channels are converted and resized one at a time (the resize is per channel, so the values are the
    same): a 36 MP image then needs one 144 MB float plane at a time instead of 432 MB for all three.
    """
    channels = []
    for c in range(3):
        x = torch.from_numpy(np.ascontiguousarray(image[..., c])).float().div_(255.0)
        if tuple(x.shape) != tuple(size):
            x = F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
        channels.append(x)
        del x
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.stack(channels) - mean) / std
