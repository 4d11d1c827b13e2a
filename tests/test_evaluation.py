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


def test_export_submission_layout(fitted_model, data_root, tmp_path, capsys):
    code = main(["export-submission", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo",
                 "--out", str(tmp_path)])
    assert code == 0
    sources = sorted((data_root / "demo" / "test_private").iterdir())
    maps = sorted((tmp_path / "anomaly_images" / "demo" / "test_private").iterdir())
    masks = sorted((tmp_path / "anomaly_images_thresholded" / "demo" / "test_private").iterdir())
    assert [p.stem for p in maps] == [p.stem for p in masks] == [p.stem for p in sources]
    for src, amap, mask in zip(sources, maps, masks):
        array = tifffile.imread(amap)
        binary = np.asarray(Image.open(mask))
        size = Image.open(src).size
        assert amap.suffix == ".tiff" and array.dtype == np.float16 and array.shape == (size[1], size[0])
        assert binary.shape == array.shape and set(np.unique(binary)) <= {0, 255}
        threshold = AnomalyDetector.load(fitted_model).thresholds().pixel_threshold
        # the mask is cut from the float32 map; float16 rounding may flip pixels right at the threshold
        assert np.mean((binary == 255) != (array.astype(np.float32) > threshold)) < 0.01
