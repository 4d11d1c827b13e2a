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
from anomalyvfm.outputs import PARTIAL, picture_files
from anomalyvfm.prediction import Prediction


def display_range(pixel_mean: float, pixel_threshold: float) -> tuple[float, float]:
    """Colour range: validation mean maps to blue, twice the threshold's distance above it to red."""
    span = max(pixel_threshold - pixel_mean, 1e-12)
    return pixel_mean, pixel_mean + 2 * span


ROW_CHUNK_PIXELS = 2_000_000  # pixels coloured per step: bounded temporaries whatever the image size


def _jet_lut() -> np.ndarray:
    """The 256 jet colours as uint8 RGB, exactly as `colormaps["jet"](x)[..., :3] * 255` gives them."""
    return (colormaps["jet"](np.arange(256))[..., :3] * 255).astype(np.uint8)


JET = _jet_lut()


def _rows(shape: tuple[int, ...]) -> tuple[range, int]:
    """Start rows of the chunks an `HxW…` array is processed in, and the chunk height."""
    step = max(1, ROW_CHUNK_PIXELS // max(shape[1], 1))
    return range(0, shape[0], step), step


def heatmap(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """`HxW` scores → `HxWx3 uint8` colours (jet), clipped to [vmin, vmax].

    A 256-entry lookup table indexed as matplotlib indexes its own (`floor(x * 256)`, 1.0 → 255), row chunk
    by row chunk: the same colours as calling the colormap, without its float64 RGBA copy (32 bytes a pixel,
    1.1 GB for a 36 MP map).
    """
    out = np.empty((*anomaly_map.shape, 3), np.uint8)
    starts, step = _rows(anomaly_map.shape)
    span = np.float32(max(vmax - vmin, 1e-12))
    for top in starts:
        norm = np.clip((anomaly_map[top : top + step].astype(np.float32) - np.float32(vmin)) / span, 0, 1)
        out[top : top + step] = JET[np.minimum((norm * np.float32(256)).astype(np.int64), 255)]
    return out


def overlay(
    image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, mask: np.ndarray | None = None, alpha: float = 0.45
) -> np.ndarray:
    """Blend the heat map onto the image (in row chunks); outline the predicted mask in white."""
    blended = np.empty_like(image, dtype=np.uint8)
    starts, step = _rows(image.shape)
    for top in starts:
        rows = slice(top, top + step)
        heat = heatmap(anomaly_map[rows], vmin, vmax)
        blended[rows] = (image[rows].astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)
    if mask is not None and mask.any():
        blended[outline(mask, max(1, min(image.shape[:2]) // 300))] = 255
    return blended


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """`mask & ~binary_erosion(mask, iterations=width)`, computed in row chunks.

    Eroding `width` times moves information `width` rows at most, so each chunk is eroded with `width` rows
    of margin on each side and only its own rows are kept: the same pixels as one whole-image erosion (whose
    border also counts as background), without its full-size temporaries (1.4 GB at 100 MP).
    """
    edge = np.empty_like(mask, dtype=bool)
    starts, step = _rows(mask.shape)
    for top in starts:
        low, high = max(0, top - width), min(mask.shape[0], top + step + width)
        eroded = binary_erosion(mask[low:high], iterations=width)
        edge[top : top + step] = mask[top : top + step] & ~eroded[top - low : top - low + step]
    return edge


def mask_image(mask: np.ndarray) -> np.ndarray:
    """Boolean mask → `0/255 uint8` image, the format MVTec AD 2 and most tools expect."""
    return mask.astype(np.uint8) * 255


def save_pictures(directory: Path, name: str, pred: Prediction, value_range: tuple[float, float]) -> None:
    """Write `<name>_overlay.png` (heat map over the image, mask outlined) and `<name>_mask.png` for one
    scored image; `value_range` is the model's `display_range`. Used by every `predict` engine, with `name`
    from `outputs.output_names` (the one owner of output names)."""
    vmin, vmax = value_range
    overlay_file, mask_file = picture_files(name)
    for filename, picture in ((overlay_file, lambda: overlay(load_rgb(pred.source), pred.anomaly_map, vmin, vmax,
                                                             pred.mask)),
                              (mask_file, lambda: mask_image(pred.mask))):
        partial = directory / f".{filename}{PARTIAL}"  # one picture in memory at a time, never half-written
        Image.fromarray(picture()).save(partial, format="PNG")
        partial.replace(directory / filename)
