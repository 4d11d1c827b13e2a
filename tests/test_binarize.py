"""Mask cuts (`maps.binarize`): each strategy against a brute-force reference, and the stored setting used
alike by predict, evaluate and exported bundles."""
from __future__ import annotations

from collections import deque
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from anomalyvfm import AnomalyDetector
from anomalyvfm.detector.settings import Settings
from anomalyvfm.head.calibration import Thresholds
from anomalyvfm.maps.binarize import (BINARIZATIONS, HYSTERESIS_FRACTION, MIN_AREA_PATCHES, adaptive_mask, defect_mask,
                                      hysteresis_mask, low_threshold, model_mask, patch_side, typical_good_maximum)


def blob(shape: tuple[int, int], centre: tuple[int, int], height: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return height * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * width**2))


def flood_fill_reference(amap: np.ndarray, threshold: float, low: float, min_area: float) -> np.ndarray:
    """Hysteresis written the slow, obvious way: grow from every strict pixel through 8-neighbours above `low`,
    then drop grown regions smaller than `min_area`."""
    h, w = amap.shape
    seen = np.zeros((h, w), bool)
    out = np.zeros((h, w), bool)
    for y0, x0 in zip(*np.nonzero(amap > threshold)):
        if seen[y0, x0]:
            continue
        region, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and amap[ny, nx] > low:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(region) >= min_area:
            out[tuple(np.array(region).T)] = True
    return out


def test_hysteresis_outlines_a_faint_defect_whole_and_leaves_faint_noise_out() -> None:
    shape = (80, 120)
    faint_defect = blob(shape, (40, 30), 0.6, 10.0)  # large and faint, above `low` over a wide area
    seed = blob(shape, (40, 30), 0.6, 2.0)  # one strong spot inside it
    faint_noise = blob(shape, (40, 95), 0.6, 6.0)  # as faint, but nowhere strong
    amap = faint_defect + seed + faint_noise
    threshold, low = 1.0, 0.3
    mask = hysteresis_mask(amap, threshold, low)
    strict = amap > threshold
    assert mask[40, 30] and mask.sum() > 5 * strict.sum()  # the faint part grown from the seed
    assert np.array_equal(mask[:, :60], amap[:, :60] > low)  # … all of it, down to `low`
    assert not mask[:, 60:].any()  # faint noise without a strong pixel: nothing
    assert not hysteresis_mask(amap, 2.0, low).any()  # no strict pixel anywhere: no region


def test_minimum_area_drops_strong_specks_smaller_than_a_patch() -> None:
    amap = np.zeros((60, 60))
    amap[10, 10] = amap[10, 11] = 5.0  # a 2-pixel speck, far above the threshold
    amap[30:45, 30:45] = 5.0  # a 225-pixel region
    kept = hysteresis_mask(amap, 1.0, 0.5, min_area=16)
    assert not kept[10:12, 10:12].any() and kept[30:45, 30:45].all()
    assert hysteresis_mask(amap, 1.0, 0.5)[10, 10]  # without a minimum area the speck stays
    # through `defect_mask`, the minimum area is MIN_AREA_PATCHES patches of `patch_side` pixels
    side = 4.0
    assert MIN_AREA_PATCHES * side**2 > 2
    masked = defect_mask(amap, 1.0, "hysteresis", normal_mean=0.0, patch_side=side)
    assert np.array_equal(masked, kept)


@pytest.mark.parametrize("seed", range(6))
def test_hysteresis_equals_a_flood_fill_on_random_maps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    amap = gaussian_filter(rng.random((40, 50)), 1.5).astype(np.float16 if seed % 2 else np.float32)
    threshold, low = np.quantile(amap, 0.97), np.quantile(amap, 0.8)
    for min_area in (0, 5, 30):
        expected = flood_fill_reference(amap, threshold, low, min_area)
        assert np.array_equal(hysteresis_mask(amap, threshold, low, min_area), expected)
    assert (hysteresis_mask(amap, threshold, low) >= (amap > threshold)).all()  # contains the global cut


def test_low_threshold_sits_between_the_normal_mean_and_the_strict_threshold() -> None:
    assert low_threshold(1.0, 0.2) == pytest.approx(0.2 + HYSTERESIS_FRACTION * 0.8)
    assert low_threshold(1.0, None) == 1.0  # no mean known: hysteresis degenerates to the strict cut
    assert low_threshold(1.0, 3.0) == 1.0  # never above the strict threshold


def test_every_cut_and_the_pass_verdict() -> None:
    shape = (60, 80)
    amap = (blob(shape, (20, 20), 3.0, 4.0) + blob(shape, (40, 60), 1.2, 8.0)
            + np.random.default_rng(5).random(shape) * 0.2).astype(np.float32)
    threshold, mean = 1.0, 0.1
    low = low_threshold(threshold, mean)
    expected = {"global": amap > threshold, "mebin": adaptive_mask(amap, threshold),
                "hysteresis": hysteresis_mask(amap, threshold, low, 9.0)}
    expected["mebin+hysteresis"] = expected["mebin"] | expected["hysteresis"]
    expected["mebin-grown"] = grown_reference(amap, expected["mebin"], threshold)  # no good maximum: the threshold
    assert set(expected) == set(BINARIZATIONS)
    for method, mask in expected.items():
        got = defect_mask(amap, threshold, method, normal_mean=mean, patch_side=3.0)
        assert np.array_equal(got, mask), method
        assert np.array_equal(defect_mask(amap, threshold, method, normal_mean=mean, patch_side=3.0,
                                          is_anomalous=True), mask)
        for verdict in (False, np.False_):  # a verdict read off a numpy array of scores counts the same
            empty = defect_mask(amap, threshold, method, normal_mean=mean, patch_side=3.0, is_anomalous=verdict)
            assert empty.shape == amap.shape and not empty.any()
    assert expected["hysteresis"].sum() > expected["global"].sum()  # the faint blob's shoulders
    with pytest.raises(ValueError, match="binarisation"):
        defect_mask(amap, threshold, "otsu")


def grown_reference(amap: np.ndarray, seeds: np.ndarray, level: float) -> np.ndarray:
    """`mebin-grown` the slow way: the seeds, plus a flood fill from every seed pixel above `level` through
    8-neighbours above it."""
    lifted = np.where(seeds & (amap > level), np.inf, amap)
    return seeds | flood_fill_reference(lifted, np.finfo(np.float64).max, level, 0)


def test_mebin_grown_outlines_a_broad_dome_down_to_a_good_parts_level() -> None:
    shape = (90, 120)
    dome = blob(shape, (45, 40), 3.0, 14.0)  # broad and faint at its edges: MEBin keeps its core
    faint = blob(shape, (45, 100), 1.4, 5.0)  # a separate region above the level but holding no MEBin pixel
    amap = (dome + faint + np.random.default_rng(3).random(shape) * 0.05).astype(np.float32)
    threshold, good = 0.5, 1.0
    core = defect_mask(amap, threshold, "mebin")
    grown = defect_mask(amap, threshold, "mebin-grown", good_maximum=good)
    assert core.any() and grown.sum() > 1.2 * core.sum() and not (core & ~grown).any()
    assert np.array_equal(grown, grown_reference(amap, core, good))
    assert not grown[:, 80:].any()  # the faint blob: above the level, but no MEBin region in it
    assert np.array_equal(defect_mask(amap, threshold, "mebin-grown", good_maximum=0.2),  # never below the threshold
                          grown_reference(amap, core, threshold))
    assert not defect_mask(amap, threshold, "mebin-grown", good_maximum=good, is_anomalous=False).any()


def test_the_good_level_is_the_median_validation_maximum_stored_with_the_statistics() -> None:
    stored = Thresholds(1.0, 0.5, {"pixel_score_mean": 0.1, "map_max_median": 0.9})
    assert typical_good_maximum(stored) == 0.9
    recorded = Thresholds(1.0, 0.5, {}, normal_samples={"validation": {"image": [0.0] * 4, "map_max": [0.7, 2.0, 0.8, 0.6]}})
    assert typical_good_maximum(recorded) == pytest.approx(0.75)  # a model calibrated before the statistic existed
    assert typical_good_maximum(Thresholds(1.0, 0.5, {})) is None
    amap = blob((80, 80), (40, 40), 3.0, 12.0).astype(np.float32)
    settings = Settings(image_size=28, binarize="mebin-grown", outline_only_flagged=False)
    assert np.array_equal(model_mask(amap, settings, stored), defect_mask(amap, 0.5, "mebin-grown", good_maximum=0.9))


def test_a_rejected_image_shows_where_when_its_cut_finds_nothing() -> None:
    amap = np.zeros((40, 40), dtype=np.float32)
    amap[10:12, 10:12] = 1.0  # a speck: MEBin's 6 x 6 erosion leaves nothing of it
    assert not defect_mask(amap, 0.5, "mebin").any()
    assert np.array_equal(defect_mask(amap, 0.5, "mebin", is_anomalous=True), amap > 0.5)  # the global cut instead
    assert not defect_mask(amap, 0.5, "mebin", is_anomalous=False).any()
    assert not defect_mask(amap, 2.0, "mebin", is_anomalous=True).any()  # nothing over the threshold: nothing to show
    blob_map = blob((40, 40), (20, 20), 2.0, 6.0).astype(np.float32)  # a cut that finds a region keeps it
    assert np.array_equal(defect_mask(blob_map, 0.5, "mebin", is_anomalous=True), defect_mask(blob_map, 0.5, "mebin"))


def test_patch_side_in_map_pixels_follows_the_views() -> None:
    assert patch_side(Settings(image_size=112), (224, 300)) == pytest.approx(28.0)  # map 2x the backbone input
    assert patch_side(Settings(image_size=112, scales=(112, 224)), (448, 500)) == pytest.approx(28.0)  # finest view
    assert patch_side(Settings(tile_size=224, tile_scale=0.5), (4000, 3000)) == pytest.approx(28.0)
    config = SimpleNamespace(tile_size=0, tile_scale=1.0, scales=[], image_size=224)  # an exported bundle's config
    assert patch_side(config, (448, 448)) == pytest.approx(28.0)


def test_model_mask_reads_the_stored_cut_thresholds_and_verdict_option() -> None:
    amap = blob((56, 56), (28, 28), 2.0, 6.0).astype(np.float32)
    thresholds = SimpleNamespace(pixel_threshold=1.0, validation_stats={"pixel_score_mean": 0.2})
    settings = Settings(image_size=28, binarize="hysteresis")  # one patch = 28 map px: area 784
    assert not model_mask(amap, settings, thresholds).any()  # the blob's region is smaller than a patch
    small = Settings(image_size=56, binarize="hysteresis", outline_only_flagged=False)  # one patch = 14 px: area 196
    grown = model_mask(amap, small, thresholds)
    assert np.array_equal(grown, amap > 0.6) and grown.sum() >= 196
    assert model_mask(amap, small, thresholds, is_anomalous=False).any()  # option off: outlined whatever the verdict
    only = replace(small, outline_only_flagged=True)
    assert not model_mask(amap, only, thresholds, is_anomalous=False).any()
    assert np.array_equal(model_mask(amap, only, thresholds, is_anomalous=True), grown)


@pytest.mark.parametrize("method", [m for m in BINARIZATIONS if m != "mebin"])  # mebin: test_thresholds.py
def test_each_cut_is_a_stored_setting_used_by_predict_and_evaluate(method, fitted_model, data_root, tmp_path,
                                                                 one_thread) -> None:
    from anomalyvfm.data import load_dataset, load_mask
    from anomalyvfm import metrics as M
    from anomalyvfm.evaluation.evaluate import evaluate

    detector = AnomalyDetector.load(fitted_model)
    dataset = load_dataset(data_root, "demo")
    before = evaluate(detector, dataset, "test_public", tmp_path / "before", progress=False)
    detector.pipeline.configure(binarize=method, outline_only_flagged=True)
    detector.save(tmp_path / "m")
    detector = AnomalyDetector.load(tmp_path / "m")
    assert detector.settings.binarize == method and detector.settings.outline_only_flagged
    samples = dataset.split("test_public")
    preds = detector.predict([s.path for s in samples], progress=False)
    t = detector.thresholds()
    for pred in preds:
        assert np.array_equal(pred.mask, model_mask(pred.anomaly_map, detector.settings, t, pred.is_anomalous))
        assert pred.is_anomalous or not pred.mask.any()  # no outline on a pass verdict
    metrics = evaluate(detector, dataset, "test_public", tmp_path / "eval", progress=False)
    truths = [load_mask(s.mask_path, p.mask.shape) if s.label else np.zeros(p.mask.shape, bool)
              for s, p in zip(samples, preds)]
    maps16 = [p.anomaly_map.astype(np.float16) for p in preds]  # evaluate keeps float16 maps
    expected = M.seg_f1_masks(truths, (model_mask(m, detector.settings, t, p.is_anomalous)
                                       for m, p in zip(maps16, preds)))
    assert metrics["seg_f1"] == pytest.approx(expected, nan_ok=True)
    for unchanged in ("aupro_0.05", "image_auroc", "class_f1"):  # cuts move masks, never maps, scores or verdicts
        assert metrics[unchanged] == before[unchanged]
    assert metrics["outlined_but_passed"] == 0


@pytest.mark.parametrize("method", ["hysteresis", "mebin-grown"])
def test_a_cut_and_the_verdict_option_travel_in_exported_forms(method, fitted_model, tmp_path, data_root,
                                                             one_thread) -> None:
    from anomalyvfm.data import load_dataset
    from anomalyvfm.deploy.export import export_model
    from anomalyvfm.deploy.load import load_predictor

    detector = AnomalyDetector.load(fitted_model)
    detector.pipeline.configure(binarize=method, outline_only_flagged=True)
    paths = [s.path for s in load_dataset(data_root, "demo").split("test_public")]
    preds = detector.predict(paths, progress=False)
    detector.save(tmp_path / "model")
    graph = load_predictor(export_model(tmp_path / "model", out=tmp_path / "linepc")[0], backend="openvino")
    assert graph.settings.binarize == method and graph.settings.outline_only_flagged
    assert typical_good_maximum(graph.thresholds()) == typical_good_maximum(detector.thresholds())
    for b, p in zip(graph.predict(paths, progress=False), preds):
        assert np.array_equal(b.mask, model_mask(b.anomaly_map, graph.settings, graph.thresholds(), b.is_anomalous))
        assert b.is_anomalous or not b.mask.any()
        assert (b.mask != p.mask).mean() < 0.01  # fp32 maps agree to 1e-5: at most a few pixels at the cut
    # a bundle exported before these settings existed still loads, with what it did then
    old = load_predictor(Path(__file__).parent / "fixtures" / "bundle_v1")
    assert old.settings.binarize == "global" and old.settings.outline_only_flagged is False
