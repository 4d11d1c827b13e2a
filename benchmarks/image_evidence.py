"""Image evidence: patch scores alone against patch + global (image-level kNN), per category.

One fit per category (default settings; the image bank is fitted with every model) and one pass over
test_public score both ways: maps (so AU-PRO and SegF1) are the same, only the image score differs. The
patch+global image threshold comes from its own calibration on the validation images. The
validation + synthetic choice (`detector.evidence`, what `--auto` does) is reported beside the test
figures; test_public is only reported, never used to choose. Also reported: the max instead of the sum
of the standardised evidences (test image AUROC), the alternative fusion.

    flock /tmp/anomalyvfm-cpu.lock python benchmarks/image_evidence.py --data ../shared/data \
        --backbone ../dinov2-vits14 --categories all --max-train-images 60 --out OUT
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from anomalyvfm.data import evenly_spaced, load_dataset, load_mask
from anomalyvfm.detector.calibration import calibrate
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.detector.evidence import choose_image_evidence
from anomalyvfm import metrics as M
from anomalyvfm.evaluation.benchmark import find_categories
from anomalyvfm.evaluation.evaluate import peak_rss_mb, reset_peak_rss
from anomalyvfm.features.extraction import FailedImage
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.scoring.image_evidence import fuse_image_evidence

KEYS = ("image_auroc", "aupro_0.05", "seg_f1", "class_f1", "seg_f1_max_oracle")


def run_category(data: str, category: str, backbone: str, max_train: int | None) -> list[dict]:
    dataset = load_dataset(data, category)
    train = [s.path for s in dataset.split("train")]
    train = evenly_spaced(train, max_train) if max_train else train
    validation = [s.path for s in dataset.split("validation")]
    reset_peak_rss()
    start = time.perf_counter()
    detector = AnomalyDetector(backbone=backbone).fit(train, validation, progress=False)
    fit_seconds = time.perf_counter() - start
    pipeline, patch_cal = detector.pipeline, detector.calibration
    start = time.perf_counter()
    choice = choose_image_evidence(pipeline, patch_cal, validation, detector.settings.seed)
    choice_seconds = time.perf_counter() - start
    pipeline.configure(image_evidence="patch+global")
    fused_cal = calibrate(pipeline, validation, "distance", False)
    test = dataset.split("test_public")
    start = time.perf_counter()
    patch, distance, maps, masks, labels = [], [], [], [], []
    for sample, items in zip(test, pipeline.view_features([s.path for s in test], None)):
        if isinstance(items, FailedImage):
            raise SystemExit(items.error)
        scored = pipeline.score_views(items)
        raw = pipeline.head.fuse(scored, patch_cal, "patch")
        amap = anomaly_map(raw.distance, scored.processed_shape, scored.image_shape, pipeline.settings.sigma)
        patch.append(raw.distance_image)
        distance.append(scored.global_distance)
        maps.append(amap.astype(np.float16))
        masks.append(load_mask(sample.mask_path, amap.shape) if sample.label else np.zeros(amap.shape, bool))
        labels.append(sample.label)
    test_seconds = time.perf_counter() - start
    labels = np.array(labels)
    stats, rows = fused_cal.image_stats, []
    z = {name: (np.array(v) - stats[name][0]) / max(stats[name][1], 1e-12) for name, v in (("patch", patch), ("global", distance))}
    for evidence, cal in (("patch", patch_cal), ("patch+global", fused_cal)):
        scores = np.array([fuse_image_evidence(p, {"global": d}, stats, evidence) for p, d in zip(patch, distance)])
        t = cal.thresholds()
        result = M.evaluate_images(labels, scores, masks, maps, t.image_threshold, t.pixel_threshold)[0]
        rows.append({"category": category, "evidence": evidence, **{k: round(float(result[k]), 4) for k in KEYS},
                     "val_image_auroc": round(choice["figures"][evidence]["val_image_auroc"], 4),
                     "val_image_auroc_global_synth": round(choice["figures"][evidence]["val_image_auroc_global_anomalies"], 4),
                     "chosen_on_validation": choice["chosen"]})
    rows[1]["val_image_auroc_max_fusion"] = round(choice["figures"]["patch+global"]["val_image_auroc_max_fusion"], 4)
    rows[1]["test_image_auroc_max_fusion"] = round(M.image_auroc(labels, np.maximum(z["patch"], z["global"])), 4)
    rows[1]["test_image_auroc_global_alone"] = round(M.image_auroc(labels, np.array(distance)), 4)
    for row in rows:
        row.update({"train_images": len(train), "validation_images": len(validation), "test_images": len(test),
                    "fit_seconds": round(fit_seconds, 1), "choice_seconds": round(choice_seconds, 1),
                    "test_images_per_second": round(len(test) / test_seconds, 2), "peak_rss_mb": round(peak_rss_mb())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--categories", default="all")
    parser.add_argument("--max-train-images", type=int)
    parser.add_argument("--out", required=True, help="folder for results.jsonl and results.md")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in find_categories(Path(args.data), args.categories):
        found = run_category(args.data, category, args.backbone, args.max_train_images)
        with open(out / "results.jsonl", "a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in found)
        print("\n".join(json.dumps(row) for row in found), flush=True)
        rows += found
    for evidence in ("patch", "patch+global"):
        mine = [r for r in rows if r["evidence"] == evidence]
        rows.append({"category": "mean", "evidence": evidence,
                     **{k: round(float(np.mean([r[k] for r in mine])), 4) for k in (*KEYS, "val_image_auroc")}})
    columns = ("category", "evidence", *KEYS, "val_image_auroc", "val_image_auroc_global_synth", "chosen_on_validation")
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n" + "".join(
        "| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    tmp = out / "results.md.tmp"
    tmp.write_text(table)
    tmp.rename(out / "results.md")
    print(table)


if __name__ == "__main__":
    main()
