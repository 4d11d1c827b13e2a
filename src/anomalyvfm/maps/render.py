"""Pictures of anomaly maps: heat-map overlays and mask images a person can read at a glance.

Colours are scaled by the model's validation statistics, not per image: a good image then looks calm
and a defect stands out, and two images' overlays can be compared by eye.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy.ndimage import binary_erosion

from anomalyvfm.data.images import load_rgb
from anomalyvfm.prediction import Prediction


def display_range(pixel_mean: float, pixel_threshold: float) -> tuple[float, float]:
    """Colour range: validation mean maps to blue, twice the threshold's distance above it to red."""
    span = max(pixel_threshold - pixel_mean, 1e-12)
    return pixel_mean, pixel_mean + 2 * span


def heatmap(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """`HxW` scores → `HxWx3 uint8` colours (jet), clipped to [vmin, vmax]."""
    norm = np.clip((anomaly_map.astype(np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (colormaps["jet"](norm)[..., :3] * 255).astype(np.uint8)


def overlay(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None, alpha: float = 0.45
) -> np.ndarray:
    """Blend the heat map onto the image; outline the predicted mask in white."""
    blended = (image.astype(np.float32) * (1 - alpha) + heatmap(anomaly_map, vmin, vmax) * alpha).astype(np.uint8)
    if mask is not None and mask.any():
        edge = mask & ~binary_erosion(mask, iterations=max(1, min(image.shape[:2]) // 300))
        blended[edge] = 255
    return blended


def mask_image(mask: np.ndarray) -> np.ndarray:
    """Boolean mask → `0/255 uint8` image, the format MVTec AD 2 and most tools expect."""
    return mask.astype(np.uint8) * 255


def save_pictures(directory: Path, name: str, pred: Prediction, value_range: tuple[float, float]) -> None:
    """Write `<name>_overlay.png` (heat map over the image, mask outlined) and `<name>_mask.png` for one
    scored image; `value_range` is the model's `display_range`. Used by every `predict` engine."""
    vmin, vmax = value_range
    image = load_rgb(pred.source)
    Image.fromarray(overlay(image, pred.anomaly_map, vmin, vmax, pred.mask)).save(directory / f"{name}_overlay.png")
    Image.fromarray(mask_image(pred.mask)).save(directory / f"{name}_mask.png")
