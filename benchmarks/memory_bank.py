"""kNN memory bank: today's reservoir against merge-and-reduce over every training patch, per category.

Each (category, bank) runs in a fresh process, so that its peak RSS is its own. Default settings
otherwise; the test_public figures use the model's own (validation) thresholds.

    nice -n 19 python benchmarks/memory_bank.py --data ../shared/data --backbone ../dinov2-vits14 \
        --categories kolektor,ball_screw_drive [--max-train-images 140]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

BANKS = ("reservoir", "merge")
KEYS = ("image_auroc", "aupro_0.05", "seg_f1", "seg_f1_max_oracle")


def run_one(data: str, category: str, backbone: str, bank: str, max_train: int | None) -> dict:
    from anomalyvfm.data import load_dataset, load_mask
    from anomalyvfm.data.datasets import evenly_spaced
    from anomalyvfm.detector.detector import AnomalyDetector
    from anomalyvfm import metrics as M
    from anomalyvfm.evaluation.evaluate import peak_rss_mb

    dataset = load_dataset(data, category)
    train = [s.path for s in dataset.split("train")]
    train = evenly_spaced(train, max_train) if max_train else train
    start = time.perf_counter()
    detector = AnomalyDetector(backbone=backbone, memory_bank=bank).fit(
        train, [s.path for s in dataset.split("validation")], progress=False)
    fit_seconds = time.perf_counter() - start
    test = dataset.split("test_public")
    scores, maps, masks = [], [], []
    for sample, pred in zip(test, detector.predict_iter([s.path for s in test], None, decide=False)):
        scores.append(pred.score)
        maps.append(pred.anomaly_map.astype(np.float16))
        masks.append(load_mask(sample.mask_path, pred.anomaly_map.shape) if sample.label
                     else np.zeros(pred.anomaly_map.shape, bool))
    t = detector.thresholds()
    result = M.evaluate_images(np.array([s.label for s in test]), np.array(scores), masks, maps,
                               t.image_threshold, t.pixel_threshold)[0]
    return {"category": category, "bank": bank, **{k: round(result[k], 4) for k in KEYS},
            "bank_rows": len(detector.pipeline.head.state_dict()["view0.bank"]), "train_images": len(train),
            "fit_seconds": round(fit_seconds, 1),
            "peak_rss_mb": round(peak_rss_mb())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--categories", default="kolektor,ball_screw_drive")
    parser.add_argument("--max-train-images", type=int)
    parser.add_argument("--one", nargs=2, metavar=("CATEGORY", "BANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        category, bank = args.one
        print(json.dumps(run_one(args.data, category, args.backbone, bank, args.max_train_images)))
        return
    rows = []
    for category in args.categories.split(","):
        for bank in BANKS:
            command = [sys.executable, __file__, "--data", args.data, "--backbone", args.backbone, "--one", category, bank]
            if args.max_train_images:
                command += ["--max-train-images", str(args.max_train_images)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(line))
            print(line, flush=True)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
