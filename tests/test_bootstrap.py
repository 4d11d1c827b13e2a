"""Bootstrap intervals (`metrics.bootstrap`) against a brute-force recomputation of every resample."""
from __future__ import annotations

import numpy as np
import pytest

from anomalyvfm.metrics import bootstrap as B
from anomalyvfm.metrics import PerImage, evaluate_images, mask_counts, seg_f1_masks


def category(seed: int, n_good: int, n_bad: int, dtype: type = np.float16, side: int = 16):
    """Labels, image scores, masks and maps of a synthetic category: defects are raised rectangles in noise,
    scores the maps' maxima plus noise (so verdicts and AUROC are imperfect). Rounded scores give ties."""
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n_good + [1] * n_bad)
    masks, maps = [], []
    for label in labels:
        mask = np.zeros((side, side), bool)
        for _ in range(rng.integers(1, 4) if label else 0):
            r, c = rng.integers(0, side - 3, size=2)
            mask[r : r + rng.integers(1, 6), c : c + rng.integers(1, 6)] = True
        amap = np.round(rng.normal(size=mask.shape) + 1.2 * mask, 2)
        masks.append(mask)
        maps.append(amap.astype(dtype))
    scores = np.round(np.array([m.astype(np.float64).max() for m in maps]) + rng.normal(0, 0.5, len(maps)), 1)
    return labels, scores, masks, maps


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("seed", range(3))
def test_every_resample_equals_a_full_recomputation(seed: int, dtype: type) -> None:
    labels, scores, masks, maps = category(seed, 5, 6, dtype)
    _, images = evaluate_images(labels, scores, masks, maps, image_threshold=2.3, pixel_threshold=1.8)
    indices = B.resample_indices(labels, 30, seed)
    got = B.resampled(images, indices)
    for r, pick in enumerate(indices):
        assert (labels[pick] == labels).all()  # resampled within each label
        full = evaluate_images(labels[pick], scores[pick], [masks[i] for i in pick], [maps[i] for i in pick], 2.3, 1.8)[0]
        for name in B.INTERVAL_METRICS:
            assert got[name][r] == pytest.approx(full[name], abs=1e-12, nan_ok=True), (name, r)
    # the interval is the central 95 % of those values
    brute = {name: np.quantile([evaluate_images(labels[p], scores[p], [masks[i] for i in p], [maps[i] for i in p],
                                                2.3, 1.8)[0][name] for p in indices], [0.025, 0.975])
             for name in B.INTERVAL_METRICS}
    for name, interval in B.intervals(images, 30, seed).items():
        assert interval == pytest.approx(list(brute[name]), abs=1e-12), name


def test_segf1_of_the_model_masks_is_resampled_from_their_counts() -> None:
    labels, scores, masks, maps = category(7, 4, 5)
    cut = [m.astype(np.float64) > 2.0 for m in maps]  # any cut: here a global one at another level
    counts = np.array([mask_counts(t, c) for t, c in zip(masks, cut)])
    result, images = evaluate_images(labels, scores, masks, maps, 2.0, 1.0, seg_counts=counts)
    assert result["seg_f1"] == pytest.approx(seg_f1_masks(masks, cut))
    indices = B.resample_indices(labels, 20, 1)
    got = B.resampled(images, indices)["seg_f1"]
    for r, pick in enumerate(indices):
        assert got[r] == pytest.approx(seg_f1_masks([masks[i] for i in pick], [cut[i] for i in pick]))


def test_intervals_contain_the_estimate_and_shrink_with_more_images() -> None:
    widths = []
    for n in (15, 60):
        labels, scores, masks, maps = category(11, n, n)
        result, images = evaluate_images(labels, scores, masks, maps, 2.3, 1.8)
        found = B.intervals(images)
        for name, (low, high) in found.items():
            assert low <= result[name] <= high, name
        widths.append({name: high - low for name, (low, high) in found.items()})
    for name in B.INTERVAL_METRICS:
        assert 0 < widths[1][name] < 0.75 * widths[0][name], name  # about half with four times the images


def test_paired_intervals(tmp_path) -> None:
    labels, scores, masks, maps = category(3, 10, 10)
    _, first = evaluate_images(labels, scores, masks, maps, 2.3, 1.8)
    assert all(v == [0.0, 0.0] for v in B.paired_intervals(first, first).values())
    better = [m + 0.8 * t for m, t in zip(maps, masks)]  # the same images, defects scored higher
    _, second = evaluate_images(labels, scores + 2 * labels, masks, better, 2.3, 1.8)
    there, back = B.paired_intervals(second, first), B.paired_intervals(first, second)
    for name in B.INTERVAL_METRICS:
        assert there[name] == pytest.approx([-back[name][1], -back[name][0]]), name
    assert there["image_auroc"][0] > 0 and there["aupro_0.05"][0] > 0  # beyond noise
    with pytest.raises(ValueError, match="same images"):
        B.paired_intervals(first, evaluate_images(labels[:-1], scores[:-1], masks[:-1], maps[:-1], 2.3, 1.8)[1])
    # stored with a run, read back for a later comparison: the same intervals
    first.save(tmp_path / "per_image.npz")
    assert B.intervals(PerImage.load(tmp_path / "per_image.npz")) == B.intervals(first)


def test_blocks_of_resamples_do_not_change_the_result(monkeypatch) -> None:
    labels, scores, masks, maps = category(5, 6, 6)
    _, images = evaluate_images(labels, scores, masks, maps, 2.3, 1.8)
    whole = B.intervals(images, 50)
    monkeypatch.setattr(B, "_BLOCK_CELLS", 1)  # one resample per block
    for name, interval in B.intervals(images, 50).items():
        assert interval == pytest.approx(whole[name], abs=1e-12), name  # sums in another order: rounding only
