"""Threshold rules from defect-free scores: each against a brute-force or closed-form reference."""
from __future__ import annotations


import numpy as np
import pytest
from scipy.stats import binomtest

from anomalyvfm import AnomalyDetector
from anomalyvfm.cli.options import settings_from_args
from anomalyvfm.declare import SettingError
from anomalyvfm.detector.calibration import Calibration, calibrate
from anomalyvfm.detector.settings import PIXEL_FALSE_ALARM_RATE, Settings
from anomalyvfm.errors import UserInputError
from anomalyvfm.maps.thresholds import (MaxRule, NormalScores, ParetoRule, QuantileRule, SigmaRule, clopper_pearson,
                                        sigma_threshold)
from anomalyvfm.scoring.moments import RunningMoments


def sample_of(images: list[np.ndarray], keep: int = 1000) -> NormalScores:
    sample = NormalScores(keep)
    for values in images:
        sample.update(values)
    return sample


def test_tail_is_the_largest_values_whatever_the_order() -> None:
    rng = np.random.default_rng(0)
    images = [np.round(rng.normal(size=(20, 30)), 2) for _ in range(7)]
    sample = sample_of(images, keep=50)
    pooled = np.sort(np.concatenate([i.ravel() for i in images]))
    np.testing.assert_array_equal(sample.tail(50), pooled[-50:])
    assert sample.n == pooled.size and not sample.complete
    assert sample.above(pooled[-10]) == np.count_nonzero(pooled > pooled[-10])
    assert sample.above(pooled[0]) is None  # below the kept tail: unknown, not guessed
    with pytest.raises(UserInputError, match="largest"):
        sample.largest(51)


def test_sigma_rule_is_the_baseline_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    images = [rng.gamma(2.0, size=(9, 11)) for _ in range(5)]
    moments = RunningMoments()
    for values in images:
        moments.update(values)
    decision = SigmaRule(3.0).decide(sample_of(images), "pixels")
    assert decision.threshold == sigma_threshold(moments, 3.0)
    assert decision.evidence["rule"] == "sigma" and decision.evidence["k"] == 3.0
    assert "+ 3 × std" in decision.evidence["text"]


@pytest.mark.parametrize("rate", [0.0001, 0.01, 0.05, 0.3])
def test_quantile_rule_rejects_at_most_rate(rate: float) -> None:
    rng = np.random.default_rng(2)
    images = [np.round(rng.normal(size=40), 1) for _ in range(10)]  # many ties
    pooled = np.concatenate(images)
    decision = QuantileRule(rate).decide(sample_of(images, keep=pooled.size), "scores")
    above = np.count_nonzero(pooled > decision.threshold)
    assert above <= np.floor(rate * pooled.size)
    # and it is the lowest such value among the data: the next lower distinct value rejects too many
    lower = pooled[pooled < decision.threshold]
    assert lower.size == 0 or np.count_nonzero(pooled > lower.max()) > np.floor(rate * pooled.size)
    assert decision.evidence["validation_false_alarms"] == above


def test_max_rule() -> None:
    images = [np.array([0.1, 0.5]), np.array([0.2, 0.9])]
    decision = MaxRule(margin=1.0).decide(sample_of(images), "scores")
    assert decision.threshold == pytest.approx(0.9 + np.std(np.concatenate(images)))
    assert decision.evidence["validation_false_alarms"] == 0


def test_pareto_rule_extrapolates_an_exponential_tail() -> None:
    """Exponential tails are generalized Pareto with shape 0: P(X > t) = rate at t = −ln(rate)."""
    values = np.random.default_rng(3).exponential(size=50_000)
    rate = 1e-5  # ten times rarer than the sample can show
    decision = ParetoRule(rate).decide(sample_of([values], keep=5000), "pixels")
    assert decision.evidence["method"] == "gpd" and decision.evidence["tail"] == 5
    assert ParetoRule(1e-3).decide(sample_of([values], keep=5000), "pixels").threshold == pytest.approx(
        -np.log(1e-3), rel=0.1)
    assert decision.threshold > values.max() * 0.9
    assert decision.threshold == pytest.approx(-np.log(rate), rel=0.35)


def test_pareto_rule_is_empirical_inside_the_data() -> None:
    values = np.random.default_rng(4).normal(size=200)
    sample = sample_of([values], keep=200)
    assert ParetoRule(0.5).decide(sample, "x").threshold == QuantileRule(0.5).decide(sample, "x").threshold


@pytest.mark.parametrize("k,n", [(0, 9), (1, 12), (5, 92), (9, 9)])
def test_clopper_pearson_matches_scipy(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_rule_settings_and_cli() -> None:
    rules = Settings().threshold_rules()
    assert {level: rule.name for level, rule in rules.items()} == {"image": "sigma", "pixel": "sigma"}
    rules = Settings(false_alarm_rate=0.01).threshold_rules()
    assert (rules["image"].name, rules["image"].rate, rules["pixel"].name) == ("gpd", 0.01, "sigma")
    rules = Settings(threshold_rule="quantile").threshold_rules()
    assert rules["pixel"].rate == PIXEL_FALSE_ALARM_RATE
    with pytest.raises(SettingError, match="false_alarm_rate"):
        Settings(false_alarm_rate=0.0)
    from anomalyvfm.cli.main import build_parser

    args = build_parser().parse_args(["fit", "--data", "d", "--out", "o", "--false-alarm-rate", "0.01",
                                      "--pixel-false-alarm-rate", "1e-4", "--threshold-rule", "gpd"])
    settings = settings_from_args(args)
    assert (settings.false_alarm_rate, settings.pixel_false_alarm_rate, settings.threshold_rule) == (0.01, 1e-4, "gpd")


def test_rule_and_evidence_are_stored_in_the_model(fitted_model, data_root, tmp_path, one_thread) -> None:
    detector = AnomalyDetector.load(fitted_model)
    assert detector.thresholds().evidence["pixel"]["rule"] == "sigma"
    validation = sorted((data_root / "demo" / "validation" / "good").iterdir())
    detector.pipeline.configure(threshold_rule="max", false_alarm_rate=0.01)
    detector.calibration = calibrate(detector.pipeline, validation, "distance", progress=False)
    t = detector.thresholds()
    assert t.evidence["image"]["validation_false_alarms"] == 0 and t.evidence["image"]["rule"] == "max"
    assert t.image_threshold == t.evidence["image"]["max"]
    detector.save(tmp_path / "m")
    loaded = AnomalyDetector.load(tmp_path / "m").thresholds()
    assert loaded.evidence == t.evidence and loaded.pixel_threshold == t.pixel_threshold
    old = detector.calibration.to_dict()
    for thresholds in old["modes"].values():
        del thresholds["evidence"]  # a model fitted before rules were stored still loads
    assert Calibration.from_dict(old, "model.json").thresholds().evidence == {}


def test_adaptive_binarisation_finds_each_blob_and_never_goes_below_the_floor() -> None:
    from scipy import ndimage

    from anomalyvfm.maps.binarize import adaptive_mask

    amap = np.random.default_rng(5).random((60, 80)) * 0.2
    yy, xx = np.mgrid[:60, :80]
    amap += 3.0 * np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 30) + 2.6 * np.exp(-((yy - 40) ** 2 + (xx - 60) ** 2) / 30)
    mask = adaptive_mask(amap, floor=0.3)
    assert ndimage.label(mask)[1] == 2 and mask[20, 20] and mask[40, 60]
    assert not mask[amap <= 0.3].any() and mask.sum() < 0.2 * mask.size
    assert not adaptive_mask(amap, floor=5.0).any()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_mebin_equals_the_reference_that_erodes_every_cut(dtype) -> None:
    """`adaptive_mask` takes one window minimum for all cuts; the reference erodes each cut (borders included)."""
    from scipy import ndimage

    from anomalyvfm.maps.binarize import ERODE, MIN_RUN, STEPS, adaptive_mask

    def reference(amap: np.ndarray, floor: float) -> np.ndarray:
        top = float(amap.max())
        if not top > floor:
            return np.zeros(amap.shape, dtype=bool)
        thresholds = np.linspace(top, floor, STEPS, endpoint=False)[1:]
        cuts = [ndimage.binary_erosion(amap > t, ERODE) for t in thresholds]
        counts = [ndimage.label(c, structure=np.ones((3, 3), bool))[1] for c in cuts]
        best = None  # (length, -start): the longest stable run with components, the first of equal ones
        for start in range(len(counts)):
            end = start
            while end < len(counts) and counts[end] == counts[start]:
                end += 1
            if (start == 0 or counts[start - 1] != counts[start]) and counts[start] and end - start >= MIN_RUN:
                best = max(best or (0, 0), (end - start, -start))
        return cuts[-best[1] + best[0] - 1] if best else np.zeros(amap.shape, dtype=bool)

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:40, :50]
    for k in range(30):
        amap = rng.random((40, 50)) * 0.3
        for _ in range(rng.integers(0, 4)):  # blobs of several sizes, some at the border
            cy, cx, r = rng.integers(0, 40), rng.integers(0, 50), rng.uniform(2, 8)
            amap += rng.uniform(1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        amap = amap.astype(dtype)
        assert np.array_equal(adaptive_mask(amap, 0.3), reference(amap, 0.3)), k


def test_defect_mask_methods_and_pooled_mask_f1() -> None:
    from anomalyvfm import metrics as M
    from anomalyvfm.maps.binarize import adaptive_mask, defect_mask

    rng = np.random.default_rng(3)
    maps = [rng.random((20, 30)).astype(np.float16) for _ in range(4)]
    truths = [m > 0.8 for m in (rng.random((20, 30)) for _ in range(4))]
    assert np.array_equal(defect_mask(maps[0], 0.5), maps[0] > 0.5)
    assert np.array_equal(defect_mask(maps[0], 0.5, "mebin"), adaptive_mask(maps[0], 0.5))
    with pytest.raises(ValueError, match="binarisation"):
        defect_mask(maps[0], 0.5, "otsu")
    # the masks of a global threshold give exactly the threshold's SegF1 (one definition of pooling)
    assert M.seg_f1_masks(truths, (defect_mask(m, 0.6) for m in maps)) == pytest.approx(M.seg_f1(truths, maps, 0.6))


def test_mebin_masks_are_a_stored_setting_used_by_predict_evaluate_and_bundles(fitted_model, data_root, tmp_path,
                                                                              one_thread) -> None:
    from anomalyvfm.data import load_dataset, load_mask
    from anomalyvfm.deploy.export import export_model
    from anomalyvfm.deploy.load import load_predictor
    from anomalyvfm import metrics as M
    from anomalyvfm.evaluation.evaluate import evaluate
    from anomalyvfm.maps.binarize import adaptive_mask

    detector = AnomalyDetector.load(fitted_model)
    detector.pipeline.configure(binarize="mebin", outline_only_flagged=False)  # the cut alone, on every image
    detector.save(tmp_path / "m")
    detector = AnomalyDetector.load(tmp_path / "m")
    assert detector.settings.binarize == "mebin"
    dataset = load_dataset(data_root, "demo")
    samples = dataset.split("test_public")
    preds = detector.predict([s.path for s in samples], progress=False)
    threshold = detector.thresholds().pixel_threshold
    for pred in preds:
        assert np.array_equal(pred.mask, adaptive_mask(pred.anomaly_map, threshold))
    assert any((pred.mask != (pred.anomaly_map > threshold)).any() for pred in preds)  # not the global cut
    metrics = evaluate(detector, dataset, "test_public", tmp_path / "eval", progress=False)
    truths = [load_mask(s.mask_path, p.mask.shape) if s.label else np.zeros(p.mask.shape, bool)
              for s, p in zip(samples, preds)]
    maps16 = [p.anomaly_map.astype(np.float16) for p in preds]  # evaluate keeps float16 maps
    expected = M.seg_f1_masks(truths, (adaptive_mask(m, threshold) for m in maps16))
    assert metrics["seg_f1"] == pytest.approx(expected)
    bundle = load_predictor(export_model(tmp_path / "m", out=tmp_path / "bundle")[0], backend="openvino")
    assert bundle.settings.binarize == "mebin"
    for b, t in zip(bundle.predict([s.path for s in samples], progress=False), preds):
        assert np.array_equal(b.mask, adaptive_mask(b.anomaly_map, threshold))
        assert (b.mask != t.mask).mean() < 0.01  # fp32 maps agree to 1e-5: at most a few pixels at the cut
