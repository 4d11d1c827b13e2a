"""95 % bootstrap intervals for the reported figures, and paired intervals for comparing two runs.

With 30–50 test images per category a difference of 0.02 in a figure is noise; an interval says how much.
The unit resampled is the *image* (pixels of one image are not independent draws), with replacement, within
each label: a test split's numbers of good and defective images are fixed by its design, not random, and
resampling them jointly could draw a set without defects, where AUROC and AU-PRO are undefined.

Every figure of a resample is recomputed exactly as `anomalyvfm.metrics` computes it on the full set, but from
the per-image reductions `metrics.PerImage` already holds: a resample is a vector of image multiplicities,
so its pooled pixel histogram (AU-PRO(0.05)) is one sparse matrix product, its pixel and image (TP, FP, FN)
(SegF1, ClassF1) one dense product, and its image AUROC a weighted Mann–Whitney sum, all for a block of
resamples at once. Intervals are percentile intervals of the resampled figures; the paired interval of two
runs on the same images uses the same resamples for both and takes percentiles of their differences.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from anomalyvfm.metrics import PerImage

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
PRO_LIMIT = 0.05  # AU-PRO's false-positive-rate limit reported with an interval
PRO_NAME = f"aupro_{PRO_LIMIT}"
INTERVAL_METRICS = ("image_auroc", PRO_NAME, "seg_f1", "class_f1")
_BLOCK_CELLS = 2**18  # histogram columns x resamples held at once (2 MB per float64 array, ~20 MB in all)


def resample_indices(labels: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) image indices: each row draws, with replacement, as many good and as many defective
    images as `labels` holds (see the module docstring)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts = [members[rng.integers(0, len(members), size=(resamples, len(members)))]
             for members in (np.flatnonzero(labels == value) for value in np.unique(labels))]
    return np.concatenate(parts, axis=1)


def _multiplicities(indices: np.ndarray, n: int) -> np.ndarray:
    """(resamples, n) float64: how often each image occurs in each resample."""
    rows = np.arange(len(indices))[:, None] * n
    return np.bincount((rows + indices).ravel(), minlength=len(indices) * n).reshape(len(indices), n).astype(np.float64)


def _f1(counts: np.ndarray) -> np.ndarray:
    """F1 of each row's (TP, FP, FN); nan where it is 0/0, as `metrics._f1`."""
    tp, fp, fn = counts.T
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.full(len(counts), np.nan), where=denominator > 0)


def _image_auroc(images: PerImage, weights: np.ndarray) -> np.ndarray:
    """Weighted Mann–Whitney AUROC of each resample (ties half), as `metrics.image_auroc` on the resampled set."""
    good, bad = images.labels == 0, images.labels == 1
    wins = (images.scores[bad][:, None] > images.scores[good][None, :]) + 0.5 * (
        images.scores[bad][:, None] == images.scores[good][None, :])
    w_bad, w_good = weights[:, bad], weights[:, good]
    pairs = w_bad.sum(axis=1) * w_good.sum(axis=1)
    return np.divide(((w_bad @ wins) * w_good).sum(axis=1), pairs, out=np.full(len(weights), np.nan), where=pairs > 0)


def _aupro(images: PerImage, weights: np.ndarray, limit: float = PRO_LIMIT) -> np.ndarray:
    """AU-PRO up to `limit` of each resample, exactly as `metrics.aupro` on the resampled images: the PRO curve
    from the resample's pooled histogram (columns high to low), each trapezoid clipped at the limit."""
    hist = images.histograms
    negatives = np.asarray(hist.negatives.T @ weights.T)[::-1]  # (columns, resamples), high score first
    region_weights = np.asarray(hist.region_weights.T @ weights.T)[::-1]
    num_ok, num_regions = negatives.sum(axis=0), weights @ hist.regions
    with np.errstate(divide="ignore", invalid="ignore"):
        fpr = np.vstack([np.zeros(len(weights)), np.cumsum(negatives, axis=0) / num_ok])
        pro = np.vstack([np.zeros(len(weights)), np.minimum(np.cumsum(region_weights, axis=0) / num_regions, 1.0)])
    x0, x1, y0, y1 = fpr[:-1], fpr[1:], pro[:-1], pro[1:]
    end = np.minimum(x1, limit)
    width = np.where(x0 < limit, end - x0, 0.0)
    rise = np.divide((y1 - y0) * width, x1 - x0, out=np.zeros_like(width), where=x1 > x0)
    area = (width * (y0 + 0.5 * rise)).sum(axis=0) / limit
    return np.where((num_ok > 0) & (num_regions > 0), area, np.nan)


METRICS: dict[str, Callable[[PerImage, np.ndarray], np.ndarray]] = {
    "image_auroc": _image_auroc,
    PRO_NAME: _aupro,
    "seg_f1": lambda images, weights: _f1(weights @ images.seg_counts),
    "class_f1": lambda images, weights: _f1(weights @ np.stack(
        [images.flagged & (images.labels == 1), images.flagged & (images.labels == 0),
         ~images.flagged & (images.labels == 1)], axis=1).astype(np.float64)),
}


def resampled(images: PerImage, indices: np.ndarray, names: tuple[str, ...] = INTERVAL_METRICS,
              rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each of `names` on every resample (rows of `indices`), computed a block of resamples at a time so the
    pooled histograms of a block stay within `_BLOCK_CELLS` cells (only AU-PRO pools histograms: without it, one
    block). `indices` may resample a larger pool of images
    than `images` holds: `rows` (boolean over that pool) then says which of its images `images` holds, in order —
    so a pixel figure over the outlined images and an image figure over all of them use the very same resamples."""
    pool = len(images.labels) if rows is None else len(rows)
    block = max(1, _BLOCK_CELLS // max(1, len(images.values))) if PRO_NAME in names else max(1, len(indices))
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(indices), block):
        weights = _multiplicities(indices[start : start + block], pool)
        for name in names:
            out[name].append(METRICS[name](images, weights if rows is None else weights[:, rows]))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def resampled_seg_f1(counts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Pooled SegF1 of every resample (rows of `indices`) from per-image pixel (TP, FP, FN) `counts`: the
    `seg_f1` of `resampled` for masks that are not a model's own (a choice among cuts)."""
    return _f1(_multiplicities(indices, len(counts)) @ np.asarray(counts, np.float64))


def _percentiles(values: np.ndarray, level: float) -> list[float]:
    """The central `level` percentile interval of the defined values; [nan, nan] when none is defined."""
    values = values[~np.isnan(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2
    return [float(v) for v in np.quantile(values, [tail, 1 - tail])]


def intervals(images: PerImage, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, list[float]]:
    """{metric: [low, high]}: percentile bootstrap intervals of `INTERVAL_METRICS` over the images."""
    values = resampled(images, resample_indices(images.labels, resamples, seed))
    return {name: _percentiles(v, level) for name, v in values.items()}


def paired_intervals(first: PerImage, second: PerImage, resamples: int = RESAMPLES, seed: int = SEED,
                     level: float = LEVEL) -> dict[str, list[float]]:
    """{metric: [low, high]} of `first` − `second` on the same resamples of the same images: a difference is
    beyond noise when its interval excludes 0. Both runs must have scored the same images in the same order."""
    if not np.array_equal(first.labels, second.labels):
        raise ValueError("a paired comparison needs the same images (labels differ in number or order)")
    indices = resample_indices(first.labels, resamples, seed)
    a, b = resampled(first, indices), resampled(second, indices)
    return {name: _percentiles(a[name] - b[name], level) for name in INTERVAL_METRICS}


def describe(resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """How the intervals were made, stored next to them."""
    return {"level": level, "resamples": resamples, "seed": seed,
            "method": "percentile bootstrap over images, resampled within each label"}
