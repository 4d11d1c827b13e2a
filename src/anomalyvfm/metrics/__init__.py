"""The MVTec AD 2 benchmark metrics, computed exactly and within a bounded memory budget.

What is measured (matching MVTec's official evaluation code):

* Image AUROC and pixel AUROC. Pixel AUROC pools every pixel of every test image, good images included.
* AU-PRO up to a false-positive-rate limit (the benchmark reports 0.05 and 0.3). Ground-truth regions are
  the 8-connected components of each mask, and every region counts equally, so that one large scratch
  cannot hide ten missed small dents. PRO at a threshold is the mean, over all regions of all images, of
  the fraction of the region scoring >= the threshold; FPR is the fraction of all defect-free pixels of
  all images (good images included) scoring >= the threshold. The curve has one point per distinct score
  (ties merged, no threshold grid), starts at (0, 0), is cut at the limit by linear interpolation,
  integrated with the trapezoid rule and divided by the limit, so a perfect detector scores 1.0.
* SegF1 and ClassF1: F1 of pixels (pooled over all test images) and of images, at fixed thresholds.
  A pixel or image is predicted anomalous when its score is strictly greater than the threshold.
* Image F1-max and pixel F1-max (`seg_f1_max_oracle`): oracle figures that look at the test labels (see
  `f1_max`, `seg_f1_max`), the best ClassF1 / SegF1 any single threshold reaches, for reference only.

Memory policy. A category holds ~750 M pixels, so nothing here allocates per-pixel arrays for the whole
category: images are visited one at a time and reduced to per-distinct-score histograms (counts of
defect and defect-free pixels, sums of region weights), from which every pooled metric follows exactly,
ties included. Float16 maps (how the caller stores them) are binned by their 16-bit pattern, so the
histograms have 65536 bins whatever the image count and no sort is needed; maps of any other dtype are
binned by `searchsorted` into the union of their distinct values, which is equally exact but costs memory
and time in proportion to the number of distinct values, so full-size categories should be passed as
float16 (continuous float32 maps of 750 M pixels would need tens of GB).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage, sparse

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_FLOAT16_BIN_VALUES = np.arange(2**16, dtype=np.uint16).view(np.float16)
_NO_ROW = (np.zeros(0, np.int32), np.zeros(0))  # an empty sparse histogram row (no region weights asked for)


@dataclass(frozen=True)
class _ScoreCounts:
    """Histogram of scores over their distinct values, ascending: all any ranking metric needs.

    `region_weights[i]` sums 1 / (size of its ground-truth region) over the defect pixels scoring
    `values[i]`; it is None when regions were not asked for.
    """

    values: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    region_weights: np.ndarray | None
    num_regions: int
    per_image: ImageHistograms | None = None  # the same counts split by image, when asked for


@dataclass(frozen=True)
class ImageHistograms:
    """One row per image over the pooled histogram's columns (`_ScoreCounts.values`), sparse: an image holds
    a few thousand of the distinct scores. Summing rows with multiplicities gives the pooled histogram of any
    resample of the images, which is what makes bootstrapping AU-PRO and SegF1 cheap (`metrics.bootstrap`)."""

    positives: sparse.csr_matrix
    negatives: sparse.csr_matrix
    region_weights: sparse.csr_matrix
    regions: np.ndarray  # ground-truth regions per image


def _binning(scores: Sequence[np.ndarray]) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Bin values and a function giving each score its bin, chosen by dtype (see the module docstring)."""
    if all(s.dtype == np.float16 for s in scores):
        return _FLOAT16_BIN_VALUES, lambda s: s.view(np.uint16)
    values = np.unique(np.concatenate([np.unique(s) for s in scores]))
    return values, lambda s: np.searchsorted(values, s)


def _score_counts(truths: Sequence[np.ndarray], scores: Sequence[np.ndarray], regions: bool,
                  per_image: bool = False) -> _ScoreCounts:
    """Accumulate the score histogram one array at a time (`truths[k]` marks the positives of `scores[k]`).

    With `regions`, each truth array must be 2-D and is split into 8-connected regions for AU-PRO. With
    `per_image`, each array's own histogram is kept too (sparse rows, `ImageHistograms`).
    """
    if len(truths) != len(scores) or not scores:
        raise ValueError(f"need as many masks as maps, at least one; got {len(truths)} and {len(scores)}")
    truths = [np.asarray(t, dtype=bool) for t in truths]
    scores = [np.asarray(s) for s in scores]
    for k, (truth, score) in enumerate(zip(truths, scores)):
        if truth.shape != score.shape:
            raise ValueError(f"item {k}: ground truth shape {truth.shape} differs from score shape {score.shape}")
        if regions and truth.ndim != 2:
            raise ValueError(f"item {k}: masks and maps must be 2-D, got shape {truth.shape}")
    bin_values, bin_of = _binning(scores)
    n_bins = len(bin_values)
    totals = np.zeros(n_bins, dtype=np.int64)
    positives = np.zeros(n_bins, dtype=np.int64)
    weights = np.zeros(n_bins)
    num_regions = 0
    rows: list[tuple] = []  # per image: sparse (bins, counts) of positives, negatives, weights; its regions
    for truth, score in zip(truths, scores):
        bins = bin_of(score)
        image_totals = np.bincount(bins.ravel(), minlength=n_bins)
        defect_bins = bins[truth]
        image_positives = np.bincount(defect_bins, minlength=n_bins)
        image_weights, count = np.zeros(0), 0
        if regions:
            region_ids, count = ndimage.label(truth, structure=_EIGHT_CONNECTED)
            region_of_pixel = region_ids[truth]
            pixel_weight = 1.0 / np.bincount(region_of_pixel)[region_of_pixel]
            image_weights = np.bincount(defect_bins, weights=pixel_weight, minlength=n_bins)
            weights += image_weights
            num_regions += count
        totals += image_totals
        positives += image_positives
        if per_image:
            rows.append((_sparse_row(image_positives), _sparse_row(image_totals - image_positives),
                         _sparse_row(image_weights, np.flatnonzero(image_positives)) if regions else _NO_ROW, count))
    counts, column_of_bin = _collapse(bin_values, positives, totals - positives, weights if regions else None,
                                      num_regions)
    if not per_image:
        return counts
    return dataclasses.replace(counts, per_image=_image_rows(rows, column_of_bin, len(counts.values)))


def _sparse_row(dense: np.ndarray, used: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bins, values) of a histogram's non-zero bins (or of `used` ones), compact: int32 bins and counts."""
    used = np.flatnonzero(dense) if used is None else used
    values = dense[used]
    return used.astype(np.int32), values.astype(np.int32) if values.dtype.kind == "i" else values


def _image_rows(rows: list[tuple], column_of_bin: np.ndarray, columns: int) -> ImageHistograms:
    """Sparse per-image histograms on the collapsed columns (equal values merged) from `_sparse_row`s."""
    def matrix(part: int) -> sparse.csr_matrix:
        pieces = [row[part] for row in rows]
        indptr = np.concatenate(([0], np.cumsum([len(bins) for bins, _ in pieces])))
        indices = column_of_bin[np.concatenate([bins for bins, _ in pieces])]
        out = sparse.csr_matrix((np.concatenate([values for _, values in pieces]), indices, indptr),
                                shape=(len(rows), columns))
        out.sum_duplicates()  # float16's -0 and +0, one column after collapsing
        return out

    return ImageHistograms(matrix(0), matrix(1), matrix(2), np.array([row[3] for row in rows], dtype=np.int64))


def _collapse(
    bin_values: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    weights: np.ndarray | None,
    num_regions: int,
) -> tuple[_ScoreCounts, np.ndarray]:
    """Drop empty bins and merge bins of equal value (float16 has two zeros, -0 and +0), sorted ascending;
    also return each bin's column in the result (-1 for an empty bin)."""
    used = positives + negatives > 0
    values = bin_values[used].astype(np.float64)
    if np.isnan(values).any():
        raise ValueError("scores contain NaN, which has no rank")
    values, merged = np.unique(values, return_inverse=True)

    def merge(per_bin: np.ndarray) -> np.ndarray:
        # Float sums; counts stay exact below 2**53 pixels, far beyond any category.
        return np.bincount(merged, weights=per_bin[used], minlength=len(values))

    column_of_bin = np.full(len(bin_values), -1, dtype=np.int64)
    column_of_bin[used] = merged
    return _ScoreCounts(
        values=values,
        positives=merge(positives).astype(np.int64),
        negatives=merge(negatives).astype(np.int64),
        region_weights=None if weights is None else merge(weights),
        num_regions=num_regions,
    ), column_of_bin


def _image_counts(labels: ArrayLike, scores: ArrayLike) -> _ScoreCounts:
    """Histogram of one score per image, after checking that labels are 0/1 and match the scores."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape or labels.size == 0:
        raise ValueError(f"labels and scores must be 1-D, non-empty, equally long; got {labels.shape}, {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (anomalous)")
    return _score_counts([labels], [scores], regions=False)


def _auroc(counts: _ScoreCounts) -> float:
    """Probability that a random positive outscores a random negative, ties counted half (Mann-Whitney U)."""
    num_pos, num_neg = counts.positives.sum(), counts.negatives.sum()
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    negatives_below = np.cumsum(counts.negatives) - counts.negatives
    wins = np.dot(counts.positives, negatives_below + 0.5 * counts.negatives)
    return float(wins / (float(num_pos) * float(num_neg)))


def _f1(tp: int, fp: int, fn: int) -> float:
    """F1 = 2TP / (2TP + FP + FN); nan when there is nothing to find and nothing was flagged (0/0)."""
    denominator = 2 * tp + fp + fn
    return float("nan") if denominator == 0 else float(2 * tp / denominator)


def _f1_above(counts: _ScoreCounts, threshold: float) -> float:
    """F1 when everything scoring strictly above `threshold` is predicted positive."""
    above = counts.values > threshold
    tp = int(counts.positives[above].sum())
    fp = int(counts.negatives[above].sum())
    return _f1(tp, fp, int(counts.positives.sum()) - tp)


def _full_pro_curve(counts: _ScoreCounts) -> tuple[np.ndarray, np.ndarray] | None:
    """PRO curve over all distinct scores from high to low, from (0, 0) to (1, 1); None when undefined.

    It is undefined without any ground-truth region (PRO is 0/0) or without any defect-free pixel (FPR is 0/0).
    """
    num_ok = counts.negatives.sum()
    if counts.num_regions == 0 or num_ok == 0:
        return None
    fpr = np.cumsum(counts.negatives[::-1]) / num_ok
    # Summing ~1/size weights can overshoot 1 by a rounding error; the official code clips too.
    pro = np.minimum(np.cumsum(counts.region_weights[::-1]) / counts.num_regions, 1.0)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _cut_curve(
    curve: tuple[np.ndarray, np.ndarray] | None, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a full curve with FPR <= `fpr_limit`, ending exactly at the limit (interpolated if needed)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if curve is None:
        return None
    fpr, pro = curve
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if fpr[end - 1] == fpr_limit:
        return fpr[:end], pro[:end]
    # fpr[0] = 0 < limit < fpr[-1] = 1, so the segment (end - 1, end) straddles the limit.
    step = (fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
    pro_at_limit = pro[end - 1] + step * (pro[end] - pro[end - 1])
    return np.append(fpr[:end], fpr_limit), np.append(pro[:end], pro_at_limit)


def _normalised_area(fpr: np.ndarray, pro: np.ndarray) -> float:
    """Trapezoid area under a cut curve divided by its FPR span, so that a perfect detector gives 1.0."""
    area = np.sum(0.5 * (pro[1:] + pro[:-1]) * np.diff(fpr))
    return float(area / fpr[-1])


def _aupro(curve: tuple[np.ndarray, np.ndarray] | None, fpr_limit: float) -> float:
    """AU-PRO from a full curve (computed once, cut at each limit); nan when the curve is undefined."""
    cut = _cut_curve(curve, fpr_limit)
    return float("nan") if cut is None else _normalised_area(*cut)


def _f1_max(counts: _ScoreCounts) -> tuple[float, float]:
    """See `f1_max`; on a pixel histogram, `seg_f1_max`."""
    # Candidate k flags every item scoring >= the k-th highest distinct score.
    tp = np.cumsum(counts.positives[::-1])
    fp = np.cumsum(counts.negatives[::-1])
    num_pos = tp[-1]
    if num_pos == 0:
        return float("nan"), float("nan")
    f1 = 2 * tp / (2 * tp + fp + (num_pos - tp))
    best = int(np.argmax(f1))
    descending = counts.values[::-1]
    # "score >= descending[best]" is "score > next lower distinct score" (or just below the lowest one).
    threshold = descending[best + 1] if best + 1 < len(descending) else np.nextafter(descending[best], -np.inf)
    return float(f1[best]), float(threshold)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC (ties counted half); nan when only good or only anomalous images are present."""
    return _auroc(_image_counts(labels, scores))


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """AUROC over all pixels of all images pooled, good images included; nan if one pixel class is absent."""
    return _auroc(_score_counts(masks, maps, regions=False))


def pro_curve(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) from (0, 0) up to exactly `fpr_limit`, one point per distinct score, ties merged.

    Use `fpr_limit=1.0` for the whole curve. Raises ValueError when the curve is undefined: no defect
    region in any mask, or no defect-free pixel at all.
    """
    cut = _cut_curve(_full_pro_curve(_score_counts(masks, maps, regions=True)), fpr_limit)
    if cut is None:
        raise ValueError("the PRO curve needs at least one defect region and one defect-free pixel")
    return cut


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by it (1.0 is perfect); nan when undefined."""
    return _aupro(_full_pro_curve(_score_counts(masks, maps, regions=True)), fpr_limit)


def seg_f1(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], threshold: float) -> float:
    """SegF1: pixel F1 pooled over all images, a pixel being anomalous when its score > `threshold`.

    The comparison is exact in float64, so a float16 map is not compared against a rounded threshold.
    """
    return _f1_above(_score_counts(masks, maps, regions=False), threshold)


def mask_counts(truth: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """Pixel (TP, FP, FN) of one predicted binary mask against its ground truth."""
    truth, mask = np.asarray(truth, bool), np.asarray(mask, bool)
    hits = int(np.count_nonzero(truth & mask))
    return hits, int(np.count_nonzero(mask)) - hits, int(np.count_nonzero(truth)) - hits


def seg_f1_masks(masks: Iterable[np.ndarray], predicted: Iterable[np.ndarray]) -> float:
    """SegF1 of predicted binary masks (a per-image binarisation such as MEBin has no single threshold),
    pooled over all images like `seg_f1`; both arguments may be generators, one image held at a time."""
    counts = [mask_counts(truth, mask) for truth, mask in zip(masks, predicted, strict=True)]
    return _f1(*np.sum(counts, axis=0, dtype=np.int64).tolist()) if counts else float("nan")


def seg_f1_at(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], thresholds: Sequence[float]) -> list[float]:
    """`seg_f1` at several thresholds from one pass over the maps (comparing threshold rules)."""
    counts = _score_counts(masks, maps, regions=False)
    return [_f1_above(counts, t) for t in thresholds]


def class_f1(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """ClassF1: image F1, an image being predicted anomalous when its score > `threshold`."""
    return _f1_above(_image_counts(labels, scores), threshold)


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best image F1 over all thresholds, and a threshold reaching it (positive: score > threshold).

    The threshold returned is a test score (the one just below the flagged images, or just below the
    lowest score when all are flagged), so `class_f1` at it gives the same F1; when several choices tie,
    the one flagging the fewest images wins.

    An oracle: it picks the threshold on the test labels themselves, so it is only an upper bound for
    comparison and must never be used to choose a threshold or any other setting. (nan, nan) when no
    image is anomalous.
    """
    return _f1_max(_image_counts(labels, scores))


def seg_f1_max(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """Best SegF1 that any single pixel threshold reaches, and such a threshold (pixel: score > threshold).

    The pixel counterpart of `f1_max`, exact from the same per-distinct-score histogram (no threshold
    grid), and equally an oracle: it tells how much a better binarisation could gain, never which
    threshold to use. (nan, nan) when no pixel is anomalous.
    """
    return _f1_max(_score_counts(masks, maps, regions=False))


@dataclass(frozen=True)
class PerImage:
    """Each test image reduced to what the figures with intervals need (`metrics.bootstrap`): its label,
    score and verdict, the pixel (TP, FP, FN) of the masks the model outputs, and its pixel histograms.
    Any resample of the images is then a weighted sum of rows, with no pass over the maps again."""

    labels: np.ndarray  # (n,) 0 good, 1 anomalous
    scores: np.ndarray  # (n,) image scores
    flagged: np.ndarray  # (n,) bool verdicts at the image threshold
    seg_counts: np.ndarray  # (n, 3) pixel TP, FP, FN of the model's masks
    histograms: ImageHistograms
    values: np.ndarray  # the histograms' column values, ascending

    def save(self, path: str | Path) -> None:
        """One .npz file (sparse matrices by their CSR parts), for comparing runs later (`paired_intervals`)."""
        parts = {name: getattr(self, name) for name in ("labels", "scores", "flagged", "seg_counts", "values")}
        parts["regions"] = self.histograms.regions
        for name in ("positives", "negatives", "region_weights"):
            matrix = getattr(self.histograms, name)
            parts.update({f"{name}.data": matrix.data, f"{name}.indices": matrix.indices,
                          f"{name}.indptr": matrix.indptr})
        np.savez_compressed(path, **parts)

    @classmethod
    def load(cls, path: str | Path) -> PerImage:
        with np.load(path, allow_pickle=False) as f:
            shape = (len(f["labels"]), len(f["values"]))
            matrices = {name: sparse.csr_matrix((f[f"{name}.data"], f[f"{name}.indices"], f[f"{name}.indptr"]), shape)
                        for name in ("positives", "negatives", "region_weights")}
            return cls(f["labels"], f["scores"], f["flagged"], f["seg_counts"],
                       ImageHistograms(**matrices, regions=f["regions"]), f["values"])


def evaluate_images(
    labels: ArrayLike,
    image_scores: ArrayLike,
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    image_threshold: float,
    pixel_threshold: float,
    seg_counts: np.ndarray | None = None,
) -> tuple[dict[str, float | int], PerImage]:
    """Every MVTec AD 2 figure for one category, and every image reduced to a `PerImage` row, from one pass
    over the maps and one PRO curve.

    `masks[k]` and `maps[k]` belong to image k (all-False mask for a good image); thresholds follow the
    score > threshold convention. `f1_max_oracle` and `seg_f1_max_oracle` are the oracles of `f1_max` and
    `seg_f1_max`, for reference only. `outlined_but_passed` and `flagged_without_outline` count the images whose
    verdict and outline disagree (a line acts on both).

    `seg_counts` ((n, 3) pixel TP, FP, FN per image, see `mask_counts`) are those of the masks the model
    outputs when it cuts them otherwise than at `pixel_threshold` (`maps.binarize`); SegF1 then comes from them.
    """
    image_counts = _image_counts(labels, image_scores)
    num_images = int(image_counts.positives.sum() + image_counts.negatives.sum())
    if num_images != len(maps):
        raise ValueError(f"{num_images} image labels but {len(maps)} maps")
    pixel_counts = _score_counts(masks, maps, regions=True, per_image=True)
    curve = _full_pro_curve(pixel_counts)
    hist = pixel_counts.per_image
    if seg_counts is None:  # the global cut's counts per image, from the histograms
        above = (pixel_counts.values > pixel_threshold).astype(np.float64)
        tp, fp = hist.positives @ above, hist.negatives @ above
        seg_counts = np.stack([tp, fp, np.asarray(hist.positives.sum(axis=1)).ravel() - tp], axis=1)
    seg_counts = np.asarray(seg_counts, dtype=np.int64).reshape(num_images, 3)
    scores = np.asarray(image_scores, dtype=np.float64)
    per_image = PerImage(np.asarray(labels, dtype=np.int64), scores, scores > image_threshold, seg_counts, hist,
                         pixel_counts.values)
    outlined = seg_counts[:, :2].sum(axis=1) > 0  # any predicted pixel (TP + FP)
    return {
        "image_auroc": _auroc(image_counts),
        "pixel_auroc": _auroc(pixel_counts),
        "aupro_0.05": _aupro(curve, 0.05),
        "aupro_0.3": _aupro(curve, 0.3),
        "seg_f1": _f1(*seg_counts.sum(axis=0).tolist()),
        "class_f1": _f1_above(image_counts, image_threshold),
        "f1_max_oracle": _f1_max(image_counts)[0],
        "seg_f1_max_oracle": _f1_max(pixel_counts)[0],
        "num_images": num_images,
        "num_anomalous": int(image_counts.positives.sum()),
        "outlined_but_passed": int((outlined & ~per_image.flagged).sum()),  # verdict and outline disagree
        "flagged_without_outline": int((per_image.flagged & ~outlined).sum()),
    }, per_image
