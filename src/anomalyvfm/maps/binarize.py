"""How a predicted defect mask is cut from an anomaly map: one small strategy per cut, chosen by `binarize`.

Every front end (predict, the service, export-submission, exported bundles) and every metric (evaluate's
SegF1, the report pictures) cuts masks through `model_mask`, so a model's stored `binarize` and
`outline_only_flagged` mean the same thing everywhere. The cuts (`CUTS`):

* `global`: pixels above the model's pixel threshold. One threshold must serve every image: set low enough
  to find faint defects it floods strong ones with their smoothed halo, set high it misses faint ones.
* `mebin`: per-image adaptive binarisation (MEBin, main-element binarisation, AnomalyNCD, CVPR 2025):
  each image's own threshold where the *structure* of the mask is most stable: sweeping thresholds from
  the image's maximum down, the number of connected components stays constant over the longest run of
  thresholds around the real defect regions and changes quickly in the noise. Here the sweep runs between
  the global pixel threshold (a floor learned on normal images, so nothing below it is ever flagged) and the
  image's maximum, in `STEPS` steps; as in the reference implementation, each cut is eroded by a 6 x 6
  square before its components are counted (specks of noise vanish instead of changing the count), runs
  shorter than `MIN_RUN` steps do not count as stable, and the threshold chosen is the lowest of the
  longest stable run with a non-zero count; the mask is that cut, eroded. An image whose maximum does not
  pass the floor, or with no stable run, gets an empty mask. (Measured against a plainer variant — 32
  steps, no erosion, any run length — on validation + synthetic anomalies of four categories: SegF1 higher
  on all four, docs/results.md.)
* `hysteresis` (as in Canny edges and in segmentation post-processing): a region is an 8-connected
  component of the pixels above a *low* threshold, kept only if it holds a pixel above the strict (pixel)
  threshold, and only if it covers at least `MIN_AREA_PATCHES` backbone patches in map pixels. A large
  faint defect with one strong spot is outlined whole; faint noise with no strong pixel is not outlined;
  a strong speck smaller than a patch is removed, since the backbone sees nothing smaller than a patch
  (one patch's score is smoothed into a blob about a patch wide, so a smaller region above the threshold
  is the tip of a peak, not a shape). The low threshold is `HYSTERESIS_FRACTION` of the way from the
  normal pixel mean (validation) to the strict threshold (`low_threshold`): it then moves with whatever
  rule set the strict one, and under the default sigma rule (mean + 3 std) it is mean + 1.5 std, a level
  that only about 7 % of normal pixels pass, so growth runs through clearly raised pixels only. Measured
  (docs/results.md, bottle and kolektor): under today's sigma-3 pixel threshold, already too low there, growing
  further down over-segments and loses; hysteresis is meant for a strict threshold (the per-image maximum of normal
  maps) with growth down to about today's level. The minimum area alone helped on both, a little.
* `mebin+hysteresis`: the union of both masks — MEBin's per-image cut where it is stable, plus the
  hysteresis regions it dropped (faint ones, or images without a stable run).
* `mebin-grown`: MEBin's regions grown down to the level a typical good part reaches (the median of the
  validation maps' maxima, `typical_good_maximum`; the pixel threshold if that is higher): the whole region
  above that level around each MEBin region is outlined. MEBin cuts a broad faint *dome* at its core — the
  component count is stable only near the peak — while the defect's extent is reached far lower (bottle,
  magnetic_tile: docs/results.md). Normal data cannot tell whether a product's defects are domes, so this cut
  is not a default: labelled defects choose it (`detector.defect_cut`, `fit --defects`) or the user does.

`outline_only_flagged` (a setting, applied after any cut): an image whose verdict is *pass* gets an empty
mask, so verdict and outline never disagree in that direction; a *rejected* image whose cut finds no region
(MEBin: no stable run) gets the global cut instead, so it shows where unless no pixel is over the pixel threshold
(then its verdict came from the image-level evidence alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from anomalyvfm.features.names import PATCH

STEPS = 64  # thresholds tried between the floor and the image maximum (the reference's 256 / sample rate 4)
MIN_RUN = 4  # steps a component count must hold to be a stable run
ERODE = np.ones((6, 6), dtype=bool)  # the reference's erosion kernel
_EIGHT = np.ones((3, 3), dtype=bool)
HYSTERESIS_FRACTION = 0.5  # low threshold: this far from the normal pixel mean to the strict threshold
MIN_AREA_PATCHES = 1.0  # hysteresis regions smaller than this many backbone patches (map pixels) are removed


@dataclass(frozen=True)
class Cut:
    """What a cut strategy may use: the strict threshold, the lower one regions grow down to, and the
    smallest region kept (map pixels). Thresholds are float64, exact against float16 or float32 maps."""

    threshold: float
    low: float
    min_area: float = 0.0
    grow: float = 0.0  # `mebin-grown`: the level MEBin's regions grow down to (never below `threshold`)


# One strategy per cut (module docstring). Thresholds are compared in float64: a float16 map against a Python
# float would round the threshold to float16; this is how the pooled SegF1 of `anomalyvfm.metrics` counts pixels.
CUTS: dict[str, Callable[[np.ndarray, Cut], np.ndarray]] = {
    "global": lambda amap, cut: amap > np.float64(cut.threshold),
    "mebin": lambda amap, cut: adaptive_mask(amap, cut.threshold),
    "hysteresis": lambda amap, cut: hysteresis_mask(amap, cut.threshold, cut.low, cut.min_area),
    "mebin+hysteresis": lambda amap, cut: CUTS["mebin"](amap, cut) | CUTS["hysteresis"](amap, cut),
    "mebin-grown": lambda amap, cut: grown_mask(amap, CUTS["mebin"](amap, cut), cut.grow),
}
BINARIZATIONS = tuple(CUTS)  # the `binarize` setting's choices


def low_threshold(threshold: float, normal_mean: float | None) -> float:
    """The level hysteresis regions grow down to: `HYSTERESIS_FRACTION` of the way from the normal pixel
    mean to the strict threshold (never above it); the strict threshold itself when no mean is known."""
    if normal_mean is None:
        return float(threshold)
    return float(min(threshold, normal_mean + HYSTERESIS_FRACTION * (threshold - normal_mean)))


def defect_mask(amap: np.ndarray, pixel_threshold: float, method: str = "global", *, normal_mean: float | None = None,
                patch_side: float = 0.0, is_anomalous: bool | None = None, good_maximum: float | None = None
                ) -> np.ndarray:
    """The predicted defect pixels of one map by cut `method` (see the module docstring).

    `normal_mean` (the validation pixel mean) places the hysteresis low threshold, `patch_side` (one backbone
    patch's side in map pixels) the minimum region area, `good_maximum` (`typical_good_maximum`) the level
    `mebin-grown` grows down to. The verdict is given only when the model outlines flagged images alone:
    `is_anomalous=False` gives an empty mask whatever the cut, `True` the global cut where the chosen one finds
    nothing.
    """
    if method not in CUTS:
        raise ValueError(f"binarisation must be one of {BINARIZATIONS}, got {method!r}")
    if is_anomalous is not None and not is_anomalous:  # numpy's False is not `False`
        return np.zeros(amap.shape, dtype=bool)
    cut = Cut(float(pixel_threshold), low_threshold(pixel_threshold, normal_mean), MIN_AREA_PATCHES * patch_side**2,
              max(float(pixel_threshold), good_maximum if good_maximum is not None else -np.inf))
    mask = CUTS[method](amap, cut)
    if is_anomalous and not mask.any():  # a rejected image shows where, if any pixel is over the threshold
        mask = CUTS["global"](amap, cut)
    return mask


def model_mask(amap: np.ndarray, settings: Any, thresholds: Any, is_anomalous: bool | None = None) -> np.ndarray:
    """The mask a model outputs for one map: its stored cut (`settings.binarize`), its pixel threshold and
    validation pixel mean (`thresholds`), the patch size of its views, and — if `settings.outline_only_flagged`
    — the image's verdict. `settings` is `Settings` or the scoring head's `HeadConfig` (same names)."""
    return defect_mask(amap, thresholds.pixel_threshold, settings.binarize,
                       normal_mean=thresholds.validation_stats.get("pixel_score_mean"),
                       patch_side=patch_side(settings, amap.shape),
                       is_anomalous=is_anomalous if settings.outline_only_flagged else None,
                       good_maximum=typical_good_maximum(thresholds))


def typical_good_maximum(thresholds: Any) -> float | None:
    """The median of the validation maps' maxima: a level a typical good part reaches somewhere, which
    `mebin-grown` grows regions down to. Calibration stores it with the validation statistics (which exported
    bundles carry); a model calibrated before has it in its validation record; None without either."""
    if "map_max_median" in thresholds.validation_stats:
        return float(thresholds.validation_stats["map_max_median"])
    maxima = getattr(thresholds, "normal_samples", {}).get("validation", {}).get("map_max")
    return float(np.median(maxima)) if maxima else None


def grown_mask(amap: np.ndarray, seeds: np.ndarray, level: float) -> np.ndarray:
    """`seeds` (MEBin's regions) plus every 8-connected region of `amap > level` that holds a seed pixel."""
    regions, count = ndimage.label(amap > np.float64(level), structure=_EIGHT)
    keep = np.zeros(count + 1, dtype=bool)
    keep[regions[seeds]] = True
    keep[0] = False
    return keep[regions] | seeds


def patch_side(settings: Any, shape: tuple[int, ...]) -> float:
    """Side of one backbone patch in pixels of a map of `shape` (maps are at the original image size): the
    reference (finest) view's short side is `image_size` (or the image is scaled by `tile_scale` when tiling)."""
    if settings.tile_size:
        return PATCH / settings.tile_scale
    return PATCH * min(shape[:2]) / max(settings.scales or (settings.image_size,))


def hysteresis_mask(amap: np.ndarray, threshold: float, low: float, min_area: float = 0.0) -> np.ndarray:
    """8-connected regions of `amap > low` that hold a pixel `> threshold` and cover `>= min_area` pixels."""
    regions, count = ndimage.label(amap > np.float64(low), structure=_EIGHT)
    keep = np.zeros(count + 1, dtype=bool)
    keep[regions[amap > np.float64(max(threshold, low))]] = True
    if min_area > 0:
        keep &= np.bincount(regions.ravel(), minlength=count + 1) >= min_area
    keep[0] = False
    return keep[regions]


def adaptive_mask(amap: np.ndarray, floor: float, steps: int = STEPS) -> np.ndarray:
    """Boolean defect mask of one map: pixels above this image's most stable threshold (>= `floor`), eroded."""
    top = float(amap.max())  # thresholds below are float64: exact against float16 or float32 maps
    if not top > floor:
        return np.zeros(amap.shape, dtype=bool)
    thresholds = np.linspace(top, floor, steps, endpoint=False)[1:]  # high to low, all above the floor
    # Eroding `amap > t` keeps the pixels whose whole window is above t: `window minimum > t`. One minimum filter
    # serves every threshold (exactly what eroding each cut gives, borders included; measured 2.4-5x per image).
    exact = amap.astype(np.promote_types(amap.dtype, np.float32))  # the filter takes no float16; float32 holds it
    window_min = ndimage.minimum_filter(exact, footprint=ERODE, mode="constant", cval=-np.inf)

    def cut(threshold: float) -> np.ndarray:
        return window_min > threshold

    counts = [ndimage.label(cut(t), structure=_EIGHT)[1] for t in thresholds]
    best_start, best_length, start = 0, 0, 0
    for k in range(1, len(counts) + 1):
        if k == len(counts) or counts[k] != counts[start]:
            if counts[start] > 0 and k - start >= MIN_RUN and k - start > best_length:
                best_start, best_length = start, k - start
            start = k
    if not best_length:
        return np.zeros(amap.shape, dtype=bool)
    return cut(thresholds[best_start + best_length - 1])
