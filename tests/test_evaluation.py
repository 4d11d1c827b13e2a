import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomalyvfm import AnomalyDetector
from anomalyvfm.cli.main import main
from anomalyvfm.evaluation.evaluate import METRIC_KEYS

REPORT_FILES = ("metrics.json", "anomaly_scores.png", "roc_curves.png", "sample_detections.png",
                "feature_analysis.png", "performance_summary.txt")


def test_evaluate_writes_metrics_and_reports(fitted_model, data_root, tmp_path, capsys):
    code = main(["evaluate", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo",
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert tuple(metrics) == METRIC_KEYS
    assert metrics["num_images"] == 16 and metrics["num_anomalous"] == 8
    assert metrics["image_auroc"] >= 0.9 and metrics["aupro_0.3"] > 0.3
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert Image.open(tmp_path / "roc_curves.png").size[0] > 500
    summary = (tmp_path / "performance_summary.txt").read_text()
    assert "AU-PRO (FPR ≤ 0.05)" in summary and "SegF1-max (oracle" in summary
    assert "pixel threshold: " in summary and "+ 3 × std" in summary  # the rule's evidence line
    assert "validation false alarms" in (tmp_path / "report.html").read_text()


def test_evaluate_refuses_unlabelled_split(fitted_model, data_root, tmp_path, capsys):
    code = main(["evaluate", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo",
                 "--split", "test_private", "--out", str(tmp_path)])
    assert code == 2 and "no labels" in capsys.readouterr().err


def test_benchmark_tables(backbone_dir, data_root, tmp_path, capsys):
    code = main(["benchmark", "--data", str(data_root), "--backbone", str(backbone_dir), "--image-size", "112",
                 "--out", str(tmp_path)])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["category"] for r in rows] == ["demo", "mean"]
    assert float(rows[0]["image_auroc"]) == pytest.approx(float(rows[1]["image_auroc"]))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["results"][0]["fit_seconds"] > 0 and results["results"][0]["peak_rss_mb"] > 0
    assert "| demo |" in (tmp_path / "results.md").read_text()
    printed = capsys.readouterr().out  # the table on stdout carries the mean over categories too
    assert "| demo |" in printed and "| mean |" in printed
    assert (tmp_path / "demo" / "model" / "config.json").is_file()
    assert (tmp_path / "demo" / "report" / "sample_detections.png").is_file()


def test_metrics_carry_bootstrap_intervals_into_every_table(fitted_model, data_root, tmp_path, capsys):
    from anomalyvfm.metrics.bootstrap import INTERVAL_METRICS, intervals
    from anomalyvfm.metrics import PerImage

    code = main(["evaluate", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo",
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["intervals"]) == set(INTERVAL_METRICS) and metrics["bootstrap"]["resamples"] == 1000
    for name, (low, high) in metrics["intervals"].items():
        assert low <= metrics[name] <= high, name
    # the per-image file reproduces them (a later paired comparison reads it)
    assert intervals(PerImage.load(tmp_path / "per_image.npz")) == pytest.approx(metrics["intervals"])
    low, high = metrics["intervals"]["image_auroc"]
    shown = f"{metrics['image_auroc']:.4f} [{low:.4f}, {high:.4f}]"
    assert shown in (tmp_path / "report.html").read_text() and shown in (tmp_path / "performance_summary.txt").read_text()


def test_benchmark_compares_variants_with_a_paired_bootstrap(backbone_dir, data_root, tmp_path, capsys):
    code = main(["benchmark", "--data", str(data_root), "--backbone", str(backbone_dir), "--image-size", "112",
                 "--variant", "plain=", "--variant", "hyst=--binarize hysteresis --outline-only-flagged",
                 "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    demo = rows[0]
    assert float(demo["seg_f1_low"]) <= float(demo["seg_f1"]) <= float(demo["seg_f1_high"])
    results = json.loads((tmp_path / "results.json").read_text())
    (compared,) = results["comparisons"]
    assert (compared["variant"], compared["baseline"], compared["category"]) == ("hyst", "plain", "demo")
    by = {(r["variant"], r["category"]): r for r in results["results"]}
    assert compared["seg_f1"] == pytest.approx(by["hyst", "demo"]["seg_f1"] - by["plain", "demo"]["seg_f1"])
    assert compared["seg_f1_low"] <= compared["seg_f1"] <= compared["seg_f1_high"]
    # the cut moves masks only: same scores, so identical image figures and a [0, 0] paired interval
    assert [compared["image_auroc_low"], compared["image_auroc_high"]] == [0.0, 0.0]
    markdown = (tmp_path / "results.md").read_text()
    assert "Paired differences (variant − plain)" in markdown and f"[{float(demo['seg_f1_low']):.3f}, " in markdown
    assert (tmp_path / "comparisons.csv").is_file()


def test_export_submission_layout(fitted_model, data_root, tmp_path, capsys):
    code = main(["export-submission", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo",
                 "--out", str(tmp_path)])
    assert code == 0
    sources = sorted((data_root / "demo" / "test_private").iterdir())
    maps = sorted((tmp_path / "anomaly_images" / "demo" / "test_private").iterdir())
    masks = sorted((tmp_path / "anomaly_images_thresholded" / "demo" / "test_private").iterdir())
    assert [p.stem for p in maps] == [p.stem for p in masks] == [p.stem for p in sources]
    preds = AnomalyDetector.load(fitted_model).predict(sources, progress=False)
    for src, amap, mask, pred in zip(sources, maps, masks, preds):
        array = tifffile.imread(amap)
        binary = np.asarray(Image.open(mask))
        size = Image.open(src).size
        assert amap.suffix == ".tiff" and array.dtype == np.float16 and array.shape == (size[1], size[0])
        assert binary.shape == array.shape and set(np.unique(binary)) <= {0, 255}
        assert np.abs(array.astype(np.float32) - pred.anomaly_map).max() <= 1e-3 * np.abs(pred.anomaly_map).max()
        assert np.array_equal(binary == 255, pred.mask)  # the model's own mask (its cut, on flagged images only)
