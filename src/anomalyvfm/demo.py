"""A tiny offline example: a generated MVTec AD 2-style dataset and a randomly initialised DINOv2.

It lets `anomalyvfm demo` and the tests run the whole pipeline without network or real weights. The
backbone is random, so the numbers say the pipeline works — not how good DINOv2 features are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def textured_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gray surface with fine stripes and noise, like brushed metal."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi)
    base = 128 + 30 * np.sin(x / 3.0 + phase) + 10 * np.sin(y / 7.0) + rng.normal(0, 6, (height, width))
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def paste_defect(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add a dark or coloured blob or scratch anywhere; return the image and its mask."""
    height, width = image.shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    cy, cx = rng.integers(10, height - 10), rng.integers(10, width - 10)
    if rng.random() < 0.5:
        ry, rx = rng.integers(5, 11, size=2)
        mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    else:
        angle = rng.uniform(0, np.pi)
        along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        mask = (np.abs(along) <= rng.integers(12, 25)) & (np.abs(across) <= 2)
    out = image.copy()
    out[mask] = rng.integers(0, 60, size=3) if rng.random() < 0.5 else np.array([200, 60, 40])
    return out, mask


def make_demo_dataset(
    root: str | Path, category: str = "demo", n_train: int = 16, n_val: int = 6, n_test: int = 8, size=(112, 154), seed: int = 0
) -> Path:
    """Write an MVTec AD 2-layout tree under `root/category`; return the category folder."""
    rng = np.random.default_rng(seed)
    base = Path(root) / category
    folders = {name: base / name for name in ("train/good", "validation/good", "test_public/good", "test_public/bad",
                                               "test_public/ground_truth/bad", "test_private")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    def save(array: np.ndarray, folder: str, index: int, suffix: str = "") -> None:
        Image.fromarray(array).save(folders[folder] / f"{index:03d}_regular{suffix}.png")

    for folder, count in (("train/good", n_train), ("validation/good", n_val), ("test_public/good", n_test)):
        for i in range(count):
            save(textured_image(rng, *size), folder, i)
    for i in range(n_test):
        image, mask = paste_defect(rng, textured_image(rng, *size))
        save(image, "test_public/bad", i)
        save((mask * 255).astype(np.uint8), "test_public/ground_truth/bad", i, "_mask")
    for i in range(n_test):
        image = textured_image(rng, *size)
        save(paste_defect(rng, image)[0] if i % 2 else image, "test_private", i)
    return base


def make_random_backbone(directory: str | Path, hidden_size: int = 48, depth: int = 4, seed: int = 0) -> Path:
    """Save a small randomly initialised DINOv2 (patch 14) that `from_pretrained` loads."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=4,
                          intermediate_size=2 * hidden_size, patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(directory)
    return Path(directory)
