"""Out-of-fold scores of training images, budget thresholds, and the `calibrate` verb."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyvfm import AnomalyDetector
from anomalyvfm.cli.main import main
from anomalyvfm.data import load_dataset
from anomalyvfm.detector import model_dir
from anomalyvfm.head.budget import add_good_images, budget_thresholds, sample
from anomalyvfm.head.head import HeadConfig, HeldOut, ScoringHead
from anomalyvfm.maps.thresholds import BudgetRule, NormalScores, clopper_pearson
from anomalyvfm.scoring.scorers import KNNScorer, MahalanobisScorer


def _images(count: int = 10, patches: int = 24, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(patches, dim, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("bank, max_candidates", [("reservoir", 10_000), ("reservoir", 100), ("merge", 100)])
def test_every_bank_row_records_the_training_image_it_came_from(bank, max_candidates):
    """Through reservoir replacement, merge-and-reduce and the coreset, each row's source holds that row."""
    images = _images()
    scorer = KNNScorer(coreset_ratio=0.5, max_candidates=max_candidates, seed=1, bank=bank)
    for index, features in enumerate(images):
        scorer.partial_fit(features, index)
    scorer.finalize()
    assert scorer.bank_sources is not None and len(scorer.bank_sources) == len(scorer.bank)
    units = [F.normalize(f, dim=1) for f in images]
    for row, source in zip(scorer.bank, scorer.bank_sources):
        assert torch.isclose(units[source] @ row, torch.tensor(1.0), atol=1e-6).any()  # the row is one of its patches


def test_merged_reservoirs_keep_their_sources():
    images = _images(count=8)
    left, right = KNNScorer(1.0, 60, seed=0), KNNScorer(1.0, 60, seed=1)
    for index, features in enumerate(images):
        (left if index < 4 else right).partial_fit(features, index)
    left.merge(right)
    left.finalize()
    units = [F.normalize(f, dim=1) for f in images]
    assert {int(s) for s in left.bank_sources} <= set(range(8)) and len(set(left.bank_sources.tolist())) > 4
    for row, source in zip(left.bank, left.bank_sources):
        assert torch.isclose(units[source] @ row, torch.tensor(1.0), atol=1e-6).any()


def test_a_training_image_is_at_distance_zero_in_sample_but_not_out_of_fold():
    """The whole bank kept (ratio 1): in-sample every patch of a training image finds itself; out of fold
    (its own rows excluded) it must not."""
    images = _images(count=6)
    scorer = KNNScorer(coreset_ratio=1.0, max_candidates=10_000)
    for index, features in enumerate(images):
        scorer.partial_fit(features, index)
    scorer.finalize()
    head = ScoringHead(HeadConfig("knn", 1, 1), {"view0.bank": scorer.bank.numpy()})
    features = images[2].numpy()
    inside = head.normal_scores(0, features)
    held = HeldOut(bank_rows=(np.flatnonzero(scorer.bank_sources == 2),))
    outside = head.normal_scores(0, features, held)
    assert np.abs(inside).max() < 1e-5
    assert outside.min() > 1e-3
    # the exclusion is exactly a bank without those rows
    without = ScoringHead(HeadConfig("knn", 1, 1), {"view0.bank": scorer.bank.numpy()[scorer.bank_sources != 2]})
    np.testing.assert_allclose(outside, without.normal_scores(0, features), atol=1e-6)


def test_mahalanobis_fold_gaussians_equal_fits_without_the_fold():
    images = _images(count=7, patches=40, dim=6)
    scorer = MahalanobisScorer(folds=3)
    for index, features in enumerate(images):
        scorer.partial_fit(features, index)
    scorer.finalize()
    assert len(scorer.fold_params) == 3
    for fold in range(3):
        alone = MahalanobisScorer()
        for index, features in enumerate(images):
            if index % 3 != fold:
                alone.partial_fit(features)
        alone.finalize()
        mean, whitener = scorer.fold_params[fold]
        np.testing.assert_allclose(mean, alone.mean.numpy(), atol=1e-5)
        np.testing.assert_allclose(whitener, alone.whitener.numpy(), rtol=1e-4, atol=1e-5)
    plain = MahalanobisScorer()
    for features in images:
        plain.partial_fit(features)
    plain.finalize()
    assert torch.equal(plain.whitener, scorer.whitener)  # keeping fold sums changes nothing in the model


def test_budget_threshold_is_the_order_statistic_and_the_check_counts_validation():
    rng = np.random.default_rng(0)
    values, validation = rng.gamma(2.0, size=1000), rng.gamma(2.0, size=40)
    sample_scores = NormalScores()
    sample_scores.update(values)
    check = NormalScores()
    check.update(validation)
    decision = BudgetRule(0.01).decide(sample_scores, "scores", check)
    assert decision.threshold == np.sort(values)[-11]  # at most 10 = 1 % of 1000 above it
    assert (values > decision.threshold).sum() == 10
    observed = int((validation > decision.threshold).sum())
    e = decision.evidence
    assert e["validation_false_alarms"] == observed and e["validation_values"] == 40
    assert e["false_alarm_ci95"] == list(clopper_pearson(observed, 40))
    assert e["prediction_within_ci"] == (e["false_alarm_ci95"][0] <= 0.01 <= e["false_alarm_ci95"][1])
    assert "validation false alarms" in e["text"] and "predicted 0.01" in e["text"]


def test_budget_pixel_threshold_reads_per_image_maxima_and_never_validation():
    rng = np.random.default_rng(1)
    oof, validation = rng.normal(size=(2, 600)), rng.normal(size=(2, 20)) + 100  # validation far above
    samples = {"out_of_fold": sample(oof[0], oof[1]), "validation": sample(validation[0], validation[1])}
    rule = BudgetRule(0.02)
    t = budget_thresholds(samples, {"image": rule, "pixel": rule}, {})
    assert t.image_threshold == np.sort(oof[0])[-13] and t.pixel_threshold == np.sort(oof[1])[-13]
    assert t.evidence["pixel"]["validation_false_alarms"] == 20  # the check sees validation, the threshold not
    assert t.evidence["pixel"]["prediction_within_ci"] is False
    more = add_good_images(t, list(rng.normal(size=600)), list(rng.normal(size=600)), 0.02)
    assert len(more.normal_samples["added"]["image"]) == 600 and more.evidence["image"]["values"] == 1200


def test_fit_with_the_budget_rule_scores_every_training_image_out_of_fold(backbone_dir, data_root, one_thread):
    dataset = load_dataset(data_root, "demo")
    train, validation = [s.path for s in dataset.split("train")], [s.path for s in dataset.split("validation")]
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, threshold_rule="budget",
                               false_alarm_rate=0.1).fit(train, validation, progress=False)
    pipeline, t = detector.pipeline, detector.thresholds()
    assert len(pipeline.out_of_fold) == len(train)
    assert len(t.normal_samples["out_of_fold"]["image"]) == len(train)
    assert len(t.normal_samples["validation"]["image"]) == len(validation)
    assert t.evidence["image"]["rule"] == "budget" and "predicted_rate" in t.evidence["pixel"]
    # excluding an image's rows can only move its patches away from the bank: out of fold >= in sample
    in_sample = [pipeline.score_views(items) for items in pipeline.view_features(train, None)]
    for inside, outside in zip(in_sample, pipeline.out_of_fold):
        assert (outside.grids[-1] >= inside.grids[-1] - 2e-3).all()  # float16 spill: ~1e-4 on a cosine
    assert np.mean([o.grids[-1].mean() - i.grids[-1].mean() for i, o in zip(in_sample, pipeline.out_of_fold)]) > 0.01
    # the budget threshold is the rule on the out-of-fold sample, nothing else
    scores = NormalScores()
    scores.update(np.array(t.normal_samples["out_of_fold"]["image"]))
    assert t.image_threshold == BudgetRule(0.1).decide(scores, "x").threshold


def test_the_budget_rule_refuses_lora_in_one_line(capsys, data_root, backbone_dir, tmp_path):
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--threshold-rule", "budget", "--lora", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--threshold-rule budget" in err and "--lora" in err


def _scores_and_maxima(model, paths) -> tuple[list[float], list[float]]:
    preds = list(AnomalyDetector.load(model).predict_iter(paths, None, decide=False))
    return [p.score for p in preds], [float(p.anomaly_map.max()) for p in preds]


def test_calibrate_round_trip(fitted_model, data_root, tmp_path, capsys, one_thread):
    good = data_root / "demo" / "test_public" / "good"
    paths = sorted(good.iterdir())
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--model", str(fitted_model), "--good", str(good), "--false-alarm-rate", "0.2",
                 "--out", str(out)]) == 0
    assert "calibrated" in capsys.readouterr().out
    scores, maxima = _scores_and_maxima(fitted_model, paths)
    t = AnomalyDetector.load(out).thresholds()
    image, pixel = NormalScores(), NormalScores()
    image.update(np.array(scores))
    pixel.update(np.array(maxima))
    assert t.image_threshold == BudgetRule(0.2).decide(image, "x").threshold
    assert t.pixel_threshold == BudgetRule(0.2).decide(pixel, "x").threshold
    assert t.evidence["image"]["validation_values"] == len(AnomalyDetector.load(fitted_model).thresholds()
                                                               .normal_samples["validation"]["image"])
    assert (out / "head.safetensors").read_bytes() == (fitted_model / "head.safetensors").read_bytes()
    preds = AnomalyDetector.load(out).predict(paths, progress=False)
    assert [p.is_anomalous for p in preds] == [s > t.image_threshold for s in scores]
    # again, in place: the added sample grows, the model stays a valid, verified directory
    assert main(["calibrate", "--model", str(out), "--good", str(good), "--out", str(out)]) == 0
    again = AnomalyDetector.load(out).thresholds()
    assert len(again.normal_samples["added"]["image"]) == 2 * len(paths)
    model_dir.read(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibrated"]  # no temporary folder left


@pytest.mark.parametrize("case", ["missing", "empty", "zero", "one", "negative", "not-a-model", "occupied-out"])
def test_calibrate_bad_input_is_one_line(case, fitted_model, data_root, tmp_path, capsys):
    good, model, out, rate = data_root / "demo" / "validation" / "good", fitted_model, tmp_path / "out", []
    if case == "missing":
        good = tmp_path / "nowhere"
    elif case == "empty":
        good = tmp_path / "empty"
        good.mkdir()
    elif case in ("zero", "one", "negative"):
        rate = ["--false-alarm-rate", {"zero": "0", "one": "1", "negative": "-0.1"}[case]]
    elif case == "not-a-model":
        model = tmp_path / "empty-model"
        model.mkdir()
    else:
        out.mkdir()
        (out / "precious.txt").write_text("x")
    code = main(["calibrate", "--model", str(model), "--good", str(good), *rate, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("anomalyvfm: error:"), err
    if case == "occupied-out":
        assert (out / "precious.txt").read_text() == "x"


def test_calibrate_a_model_through_its_exported_form(fitted_model, data_root, tmp_path, one_thread):
    """A line-PC copy (graph form, no torch weights) calibrates like a model directory; the new samples and
    thresholds are in its config.json, every checksum still holds."""
    pytest.importorskip("onnxruntime")
    from anomalyvfm.deploy.export import export_model
    from anomalyvfm.deploy.load import load_predictor

    linepc, _ = export_model(fitted_model, "onnx", "fp32", out=tmp_path / "linepc")
    good = data_root / "demo" / "test_public" / "good"
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--model", str(linepc), "--good", str(good), "--false-alarm-rate", "0.2",
                 "--out", str(out)]) == 0
    preds = list(load_predictor(linepc).predict_iter(sorted(good.iterdir()), None, decide=False))
    image, pixel = NormalScores(), NormalScores()
    image.update(np.array([p.score for p in preds]))
    pixel.update(np.array([float(p.anomaly_map.max()) for p in preds]))
    calibrated = load_predictor(out)  # checksums verified
    assert calibrated.form["format"] == "onnx"  # still the graph form: no torch involved
    t = calibrated.thresholds()
    assert t.image_threshold == BudgetRule(0.2).decide(image, "x").threshold
    assert t.pixel_threshold == BudgetRule(0.2).decide(pixel, "x").threshold
    assert t.evidence["image"]["rule"] == "budget" and "validation false alarms" in t.evidence["image"]["text"]
    assert len(t.normal_samples["added"]["image"]) == len(preds)
    assert [p.is_anomalous for p in calibrated.predict_iter(sorted(good.iterdir()), None)] == \
        [p.score > t.image_threshold for p in preds]


def test_an_earlier_bundle_is_not_calibrated_in_place_of_export(tmp_path, data_root, capsys):
    bundle = Path(__file__).parent / "fixtures" / "bundle_v1"
    code = main(["calibrate", "--model", str(bundle), "--good", str(data_root / "demo" / "validation" / "good"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "export the model again" in err and len(err.splitlines()) == 1, err
