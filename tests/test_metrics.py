"""Metrics against brute-force references written the slow, obvious way, plus hand-computed edge cases.

Float64 maps take the searchsorted binning path and float16 maps the bit-pattern path, so every
reference test runs on both dtypes.
"""
from __future__ import annotations

import tracemalloc
from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from anomalyvfm.metrics import (
    aupro,
    class_f1,
    evaluate_images,
    f1_max,
    image_auroc,
    pixel_auroc,
    pro_curve,
    seg_f1,
    seg_f1_at,
    seg_f1_max,
    seg_f1_masks,
)

SEEDS = range(8)
DTYPES = [np.float64, np.float16]


def random_category(seed: int, dtype: type) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """3-6 images of 10x12 px; some good, the others with several rectangular defects (single pixels too).

    Scores are rounded to one decimal so that ties are many, and include negative values and -0.0.
    """
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for k in range(rng.integers(3, 7)):
        mask = np.zeros((10, 12), dtype=bool)
        if k % 3 != 0:
            for _ in range(rng.integers(1, 5)):
                r, c = rng.integers(0, 10), rng.integers(0, 12)
                mask[r : r + rng.integers(1, 4), c : c + rng.integers(1, 5)] = True
        amap = np.round(rng.normal(size=mask.shape) + 1.5 * mask, 1)
        amap[0, 0] = -0.0
        masks.append(mask)
        maps.append(amap.astype(dtype))
    return masks, maps


def brute_pro_curve(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One point per distinct score, each counted with explicit loops over images and regions."""
    maps = [m.astype(np.float64) for m in maps]
    regions = []
    for k, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(k, labelled == r) for r in range(1, n + 1)]
    num_ok = sum(np.count_nonzero(~mask) for mask in masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        false_pos = sum(np.count_nonzero(~mask & (amap >= t)) for mask, amap in zip(masks, maps))
        fprs.append(false_pos / num_ok)
        pros.append(np.mean([np.mean(maps[k][region] >= t) for k, region in regions]))
    return np.array(fprs), np.array(pros)


def official_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """The integration of MVTec's official evaluation code (generic_util.trapezoid), restated."""
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def pooled(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]).astype(np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_pro_curve_matches_brute_force(seed: int, dtype: type) -> None:
    masks, maps = random_category(seed, dtype)
    want_fpr, want_pro = brute_pro_curve(masks, maps)
    fpr, pro = pro_curve(masks, maps, fpr_limit=1.0)
    assert fpr.shape == want_fpr.shape
    np.testing.assert_allclose(fpr, want_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, want_pro, rtol=0, atol=1e-12)

    fpr, pro = pro_curve(masks, maps, fpr_limit=0.3)
    inside = want_fpr <= 0.3
    assert fpr[-1] == 0.3
    np.testing.assert_allclose(fpr[: inside.sum()], want_fpr[inside], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.interp(0.3, fpr, pro), pro[-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_aupro_matches_official_integration(seed: int, dtype: type, limit: float) -> None:
    masks, maps = random_category(seed, dtype)
    want = official_trapezoid(*brute_pro_curve(masks, maps), x_max=limit) / limit
    assert aupro(masks, maps, limit) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_auroc_matches_sklearn(seed: int, dtype: type) -> None:
    masks, maps = random_category(seed, dtype)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(*pooled(masks, maps)), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_float16_and_float64_paths_agree(seed: int) -> None:
    masks, maps16 = random_category(seed, np.float16)
    maps64 = [m.astype(np.float64) for m in maps16]
    labels = np.array([m.any() for m in masks], dtype=int)
    scores = np.array([m.max() for m in maps64])
    got16 = evaluate_images(labels, scores, masks, maps16, image_threshold=1.0, pixel_threshold=0.7)[0]
    got64 = evaluate_images(labels, scores, masks, maps64, image_threshold=1.0, pixel_threshold=0.7)[0]
    assert got16.keys() == got64.keys()
    for key in got16:
        assert got16[key] == pytest.approx(got64[key], abs=1e-12), key


def test_negative_and_positive_zero_are_one_threshold() -> None:
    masks = [np.array([[True, False], [False, False]])]
    maps = [np.array([[-0.0, 0.0], [0.0, 1.0]], dtype=np.float16)]
    fpr, pro = pro_curve(masks, maps, fpr_limit=1.0)
    np.testing.assert_array_equal(fpr, [0.0, 1 / 3, 1.0])
    np.testing.assert_array_equal(pro, [0.0, 0.0, 1.0])


def test_one_pixel_region_weighs_like_a_large_one() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = True
    mask[3:5, 3:5] = True
    amap = np.zeros((6, 6))
    amap[0, 0] = 1.0
    fpr, pro = pro_curve([mask], [amap], fpr_limit=1.0)
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(pro, [0.0, 0.5, 1.0])
    # PRO(f) = 0.5 + 0.5 f, integrated over [0, 0.3] and divided by 0.3.
    assert aupro([mask], [amap], 0.3) == pytest.approx(0.575, abs=1e-12)


def test_regions_are_8_connected() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True
    amap = np.zeros((4, 4))
    amap[0, 0] = 1.0
    _, pro = pro_curve([mask], [amap], fpr_limit=1.0)
    assert pro[1] == pytest.approx(1 / 3)  # one region of 3 pixels; 4-connectivity would give (1 + 0) / 2


def test_good_images_count_in_fpr() -> None:
    anomalous = np.array([[True, False], [False, False]])
    good = np.zeros((2, 2), dtype=bool)
    masks = [anomalous, good]
    maps = [np.array([[1.0, 0.0], [0.0, 0.0]]), np.full((2, 2), 2.0)]
    assert aupro(masks[:1], maps[:1], 0.3) == 1.0
    # The good image's 4 pixels outscore the defect: PRO stays 0 until FPR 4/7.
    assert aupro(masks, maps, 0.3) == 0.0
    assert aupro(masks, maps, 1.0) == pytest.approx(3 / 7, abs=1e-12)


def test_constant_maps() -> None:
    masks, maps = random_category(1, np.float64)
    maps = [np.full(m.shape, 0.25) for m in maps]
    fpr, pro = pro_curve(masks, maps, fpr_limit=0.3)
    np.testing.assert_allclose(fpr, [0.0, 0.3])
    np.testing.assert_allclose(pro, [0.0, 0.3])
    assert aupro(masks, maps, 0.3) == pytest.approx(0.15, abs=1e-12)
    assert pixel_auroc(masks, maps) == 0.5


def test_perfect_detector() -> None:
    masks, _ = random_category(2, np.float64)
    maps = [m.astype(np.float16) for m in masks]
    labels = np.array([m.any() for m in masks], dtype=int)
    got = evaluate_images(labels, labels * 2.0, masks, maps, image_threshold=1.0, pixel_threshold=0.5)[0]
    for key in ("image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "seg_f1", "class_f1", "f1_max_oracle",
                "seg_f1_max_oracle"):
        assert got[key] == 1.0, key


def test_category_without_anomalies() -> None:
    masks = [np.zeros((5, 5), dtype=bool)] * 3
    maps = [np.random.default_rng(k).random((5, 5)).astype(np.float16) for k in range(3)]
    labels, scores = np.zeros(3, dtype=int), np.array([0.1, 0.5, 0.9])
    got = evaluate_images(labels, scores, masks, maps, image_threshold=0.5, pixel_threshold=0.5)[0]
    assert got["num_images"] == 3 and got["num_anomalous"] == 0
    for key in ("image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "f1_max_oracle", "seg_f1_max_oracle"):
        assert np.isnan(got[key]), key
    assert got["class_f1"] == 0.0 and got["seg_f1"] == 0.0  # false positives, nothing to find
    assert np.isnan(class_f1(labels, scores, threshold=1.0))  # nothing to find, nothing flagged
    assert f1_max(labels, scores) == pytest.approx((np.nan, np.nan), nan_ok=True)
    with pytest.raises(ValueError, match="defect region"):
        pro_curve(masks, maps)


def test_aupro_nan_without_defect_free_pixels() -> None:
    assert np.isnan(aupro([np.ones((3, 3), dtype=bool)], [np.zeros((3, 3))], 0.3))


@pytest.mark.parametrize("seed", SEEDS)
def test_image_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.r_[0, 1, rng.integers(0, 2, 30)]
    scores = np.round(rng.normal(size=32) + labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(image_auroc(np.ones(4, dtype=int), np.arange(4.0)))


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_functions_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.random(50) < 0.3, rng.random(50) < 0.4
    assert seg_f1_masks([y_true], [y_pred]) == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)

    masks, maps = random_category(seed, np.float16)
    pixels_true, pixel_scores = pooled(masks, maps)
    want = f1_score(pixels_true, pixel_scores > 0.5)
    assert seg_f1(masks, maps, threshold=0.5) == pytest.approx(want, abs=1e-12)
    assert seg_f1_at(masks, maps, [0.5, 1.0]) == [seg_f1(masks, maps, 0.5), seg_f1(masks, maps, 1.0)]

    labels = np.r_[0, 1, rng.integers(0, 2, 20)]
    scores = np.round(rng.normal(size=22) + labels, 1)
    assert class_f1(labels, scores, threshold=0.5) == pytest.approx(f1_score(labels, scores > 0.5), abs=1e-12)


def test_f1_edge_conventions() -> None:
    assert np.isnan(seg_f1_masks([[False, False]], [[False, False]]))
    assert seg_f1_masks([[True, False]], [[False, True]]) == 0.0
    # Strictly greater: a score equal to the threshold is predicted good.
    assert class_f1([1, 0], [0.5, 0.2], threshold=0.5) == 0.0
    # float16 map vs a threshold that rounds up to the map value in float16: still compared exactly.
    value = np.float16(0.1)
    threshold = float(value) - 1e-6
    assert np.float16(threshold) == value
    assert seg_f1([np.array([[True]])], [np.array([[value]])], threshold) == 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.r_[0, 1, rng.integers(0, 2, 25)]
    scores = np.round(rng.normal(size=27) + labels, 1)
    distinct = np.unique(scores)
    candidates = np.r_[np.nextafter(distinct[0], -np.inf), distinct]
    want = max(f1_score(labels, scores > t, zero_division=0) for t in candidates)
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(want, abs=1e-12)
    assert class_f1(labels, scores, threshold) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_seg_f1_max_matches_brute_force(seed: int, dtype: type) -> None:
    """Every distinct pixel score (and one below the lowest) tried as a threshold on the pooled pixels."""
    masks, maps = random_category(seed, dtype)
    pixels_true, pixel_scores = pooled(masks, maps)
    distinct = np.unique(pixel_scores)
    candidates = np.r_[np.nextafter(distinct[0], -np.inf), distinct]
    want = max(f1_score(pixels_true, pixel_scores > t, zero_division=0) for t in candidates)
    best, threshold = seg_f1_max(masks, maps)
    assert best == pytest.approx(want, abs=1e-12)
    assert seg_f1(masks, maps, threshold) == pytest.approx(best, abs=1e-12)
    labels = np.array([m.any() for m in masks], dtype=int)
    got = evaluate_images(labels, np.array([float(m.max()) for m in maps]), masks, maps, 0.5, 0.5)[0]
    assert got["seg_f1_max_oracle"] == best and got["seg_f1_max_oracle"] >= got["seg_f1"]


def test_evaluate_images_matches_individual_functions() -> None:
    masks, maps = random_category(3, np.float16)
    labels = np.array([m.any() for m in masks], dtype=int)
    scores = np.array([float(m.max()) for m in maps])
    got = evaluate_images(labels, scores, masks, maps, image_threshold=1.5, pixel_threshold=0.8)[0]
    outlined, flagged = np.array([(m > 0.8).any() for m in maps]), scores > 1.5
    assert got == pytest.approx(
        {
            "image_auroc": image_auroc(labels, scores),
            "pixel_auroc": pixel_auroc(masks, maps),
            "aupro_0.05": aupro(masks, maps, 0.05),
            "aupro_0.3": aupro(masks, maps, 0.3),
            "seg_f1": seg_f1(masks, maps, 0.8),
            "class_f1": class_f1(labels, scores, 1.5),
            "f1_max_oracle": f1_max(labels, scores)[0],
            "seg_f1_max_oracle": seg_f1_max(masks, maps)[0],
            "num_images": len(masks),
            "num_anomalous": int(labels.sum()),
            "outlined_but_passed": int((outlined & ~flagged).sum()),
            "flagged_without_outline": int((flagged & ~outlined).sum()),
        },
        abs=1e-15,
    )


def test_verdict_and_outline_disagreements_are_counted() -> None:
    """Four images: agree (flagged, outlined), agree (pass, clean), outlined but passed, flagged without outline."""
    maps = [np.zeros((4, 4)) for _ in range(4)]
    maps[0][1, 1] = maps[2][2, 2] = 1.0  # above the pixel threshold 0.5
    scores, labels = np.array([2.0, 0.0, 0.5, 2.0]), np.array([1, 0, 1, 0])
    masks = [m > 0.5 if label else np.zeros((4, 4), bool) for m, label in zip(maps, labels)]
    got = evaluate_images(labels, scores, masks, maps, image_threshold=1.0, pixel_threshold=0.5)[0]
    assert (got["outlined_but_passed"], got["flagged_without_outline"]) == (1, 1)
    counts = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]])  # the model's own masks: image 2 not outlined
    got = evaluate_images(labels, scores, masks, maps, 1.0, 0.5, seg_counts=counts)[0]
    assert (got["outlined_but_passed"], got["flagged_without_outline"]) == (0, 1)


def test_invalid_inputs_are_rejected() -> None:
    mask, amap = np.zeros((3, 3), dtype=bool), np.zeros((3, 3))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([mask], [np.full((3, 3), np.nan, dtype=np.float16)])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc([mask], [np.full((3, 3), np.nan)])
    with pytest.raises(ValueError, match="shape"):
        aupro([mask], [np.zeros((3, 4))], 0.3)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([mask], [amap], 0.0)
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="maps"):
        evaluate_images([0, 1], [0.1, 0.2], [mask], [amap], 0.5, 0.5)


def test_float16_path_memory_stays_per_image() -> None:
    """5 M float16 pixels in 20 images: a pooled float64 copy alone would take 40 MB."""
    rng = np.random.default_rng(0)
    masks = [rng.random((500, 500)) < 0.01 for _ in range(20)]
    maps = [rng.random((500, 500), dtype=np.float32).astype(np.float16) for _ in range(20)]
    tracemalloc.start()
    try:
        evaluate_images(np.ones(20, dtype=int), np.ones(20), masks, maps, 0.5, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
