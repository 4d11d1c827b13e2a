"""Foreground guidance: a mask of the object from the backbone's own patch features.

On object categories (a screw on a table, a can on a belt) the background is often the noisiest part
of an anomaly map: shadows, dust and clutter are "unlike the training patches" without being defects.
DINOv2's first principal component of patch features separates object from background without labels
(DINOv2 paper, fig. 1), so the mask costs one projection per patch and no extra model.

* The component is fitted on a sample of training patches; its sign is fixed so that the image centre
  (where parts are placed) is foreground, and the cut is Otsu's threshold on the sampled projections.
* The mask is dilated by one patch so that defects on the object's outline (chips, breaks) survive.
* Background patches are not zeroed (a hole in the map would itself look like a structure): their
  scores are capped at the median score of the image's foreground, i.e. "as normal as the object".
* Textures have no background: the component then splits the texture arbitrarily (often by brightness,
  so dark defects and the darker rim of a lit surface fall on the "background" side). `auto` therefore
  applies the mask only when it looks like an object: on validation images it does not cover nearly
  everything and covers the centre clearly more than the border, and the training projections are
  really two classes — Otsu's separability (between-class / total variance) is 2/pi = 0.64 for one
  Gaussian and approaches 1 for two well-separated modes.
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLE_PATCHES = 20_000  # training patches kept for the PCA: ample for one direction, bounded memory
AUTO_MAX_COVERAGE = 0.9  # a mask covering more than this of validation patches: texture, no background
AUTO_MIN_CONTRAST = 0.3  # centre coverage must exceed border coverage by this for an object
AUTO_MIN_SEPARABILITY = 0.75  # halfway between one mode (0.64) and a clean object/background split (~0.87)
CENTRE, BORDER = 1, 2


def patch_regions(height: int, width: int) -> torch.Tensor:
    """`(h, w)` labels: CENTRE for the middle half in both directions, BORDER for the outer ring, else 0."""
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    centre = ((rows >= height / 4) & (rows < 3 * height / 4)) & ((cols >= width / 4) & (cols < 3 * width / 4))
    border = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
    return torch.where(border, BORDER, torch.where(centre, CENTRE, 0))


def otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """The cut maximising between-class variance of `values` (Otsu 1979), and that variance / total variance."""
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)
    above = below[-1] - below
    sum_below = np.cumsum(hist * centres)
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (sum_below[-1] - sum_below) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2 / below[-1] ** 2
    best = int(np.argmax(between))
    return float(edges[1 + best]), float(between[best] / max(float(np.var(values)), 1e-12))


class ForegroundModel:
    """First principal component of normal patch features, thresholded: fit, then `mask` per image."""

    def __init__(self, per_image: int = SAMPLE_PATCHES, seed: int = 0) -> None:
        self.per_image = max(1, per_image)
        self._generator = torch.Generator().manual_seed(seed)
        self._sample: list[torch.Tensor] = []
        self._regions: list[torch.Tensor] = []
        self.mean: torch.Tensor | None = None
        self.component: torch.Tensor | None = None
        self.threshold: float | None = None
        self.separability: float | None = None

    def partial_fit(self, grid: torch.Tensor) -> None:
        """Keep a random `per_image` patches of one training image's `(h, w, C)` grid, with their regions."""
        h, w, dim = grid.shape
        keep = torch.randperm(h * w, generator=self._generator)[: self.per_image]
        self._sample.append(grid.reshape(h * w, dim)[keep].float())
        self._regions.append(patch_regions(h, w).reshape(-1)[keep])

    def merge(self, other: "ForegroundModel") -> None:
        """Add another unfinalised model's per-image samples (images fitted elsewhere, e.g. on a worker)."""
        self._sample += other._sample
        self._regions += other._regions

    def finalize(self) -> None:
        x, regions = torch.cat(self._sample).double(), torch.cat(self._regions)
        self.mean = x.mean(0)
        centred = x - self.mean
        component = torch.linalg.eigh(centred.T @ centred)[1][:, -1]
        projection = centred @ component
        centre, border = projection[regions == CENTRE], projection[regions == BORDER]
        if len(centre) and len(border) and centre.mean() < border.mean():
            component, projection = -component, -projection
        self.mean, self.component = self.mean.float(), component.float()
        self.threshold, self.separability = otsu(projection.numpy())
        self._sample, self._regions = [], []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "component": self.component,
                "threshold": torch.tensor([self.threshold]), "separability": torch.tensor([self.separability])}


def mask_stats(separability: float, masks: list[torch.Tensor]) -> dict[str, float]:
    """Fraction of patches in `masks` overall, in the centre and on the border; the model's `separability`."""
    total = sum(m.numel() for m in masks)
    sums = {"coverage": sum(float(m.sum()) for m in masks) / max(total, 1), "separability": separability}
    for name, label in (("centre", CENTRE), ("border", BORDER)):
        parts = [m[patch_regions(*m.shape) == label] for m in masks]
        n = sum(p.numel() for p in parts)
        sums[name] = sum(float(p.sum()) for p in parts) / n if n else 0.0
    return sums


def looks_like_object(stats: dict[str, float]) -> bool:
    """The `auto` rule: apply the mask only for an object on a background (see the module docstring)."""
    return (stats["coverage"] <= AUTO_MAX_COVERAGE and stats["centre"] - stats["border"] >= AUTO_MIN_CONTRAST
            and stats["separability"] >= AUTO_MIN_SEPARABILITY)
