"""Choose the backbone blocks for patch features using train + validation data only.

Fits one Mahalanobis scorer per block combination in a single pass (the streamed sums of all blocks
are shared, each combination takes its sub-block), then scores the validation good images and
synthetic anomalies made on them (`anomalyvfm.synthesis`). The choice is the combination with the best
validation AU-PRO(0.05) + image AUROC. With `--report-split test_public` it also prints the test
figures of every combination, for information only — they are never used to choose.

    python benchmarks/choose_layers.py --data ../shared/data --category magnetic_tile \
        --backbone DIR --train-stride 4 [--report-split test_public]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from anomalyvfm import metrics as M
from anomalyvfm.autoconfig import block_dims
from anomalyvfm.backbone import load_backbone
from anomalyvfm.data import load_dataset, load_mask, load_rgb
from anomalyvfm.features import ImageFeatures, extract_features
from anomalyvfm.maps import anomaly_map, image_score
from anomalyvfm.scoring import MahalanobisScorer
from anomalyvfm.synthesis import synthetic_set

COMBOS = [(4,), (6,), (8,), (9,), (10,), (12,), (4, 8), (5, 8), (6, 9), (7, 10), (8, 11), (9, 12), (6, 8, 10)]


def score_split(backbone, scorers, images, masks, image_size: int) -> dict:
    """Per combination: image scores and float16 maps for `images`; then the metrics."""
    labels = np.array([m is not None and m.any() for m in masks], int)
    per = {c: ([], []) for c in scorers}
    for item in extract_features(backbone, images, image_size, 1, "score"):
        assert isinstance(item, ImageFeatures)
        h, w, dim = item.features.shape
        flat = item.features.reshape(h * w, dim)
        for combo, (scorer, dims) in scorers.items():
            patch = scorer.score(flat[:, dims]).reshape(h, w)
            per[combo][0].append(image_score(patch))
            per[combo][1].append(anomaly_map(patch, item.processed_shape, item.image_shape).astype(np.float16))
    gt = [m if m is not None else np.zeros(mp.shape, bool) for m, mp in zip(masks, per[next(iter(per))][1])]
    out = {}
    for combo, (scores, maps) in per.items():
        out[combo] = {"image_auroc": M.image_auroc(labels, np.array(scores)), "aupro_0.05": M.aupro(gt, maps, 0.05)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--train-stride", type=int, default=4, help="use every N-th training image")
    parser.add_argument("--report-split", help="also print this labelled split's figures (information only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = load_dataset(args.data, args.category)
    depth = max(max(c) for c in COMBOS)
    backbone = load_backbone(args.backbone, list(range(1, depth + 1)))
    start = time.perf_counter()
    full = MahalanobisScorer()
    train = [s.path for s in dataset.split("train")][:: args.train_stride]
    for item in extract_features(backbone, train, args.image_size, 1, "fit all blocks"):
        full.partial_fit(item.features.reshape(-1, item.features.shape[-1]))
    scorers = {}
    for combo in COMBOS:
        dims = block_dims(combo, backbone.layers, backbone.hidden_size)
        scorer = full.subset(dims)
        scorer.finalize()
        scorers[combo] = (scorer, dims)
    val = [load_rgb(s.path) for s in dataset.split("validation")]
    synthetic = synthetic_set(val, per_stage=max(1, len(val) // 3), seed=0)
    images = val + [img for img, _, _ in synthetic]
    masks = [None] * len(val) + [m for _, m, _ in synthetic]
    results = {"validation": score_split(backbone, scorers, images, masks, args.image_size)}
    if args.report_split:
        test = dataset.split(args.report_split)
        test_masks = [load_mask(s.mask_path) if s.label else None for s in test]
        results[args.report_split] = score_split(backbone, scorers, [s.path for s in test], test_masks, args.image_size)
    val_rank = {c: r["aupro_0.05"] + r["image_auroc"] for c, r in results["validation"].items()}
    best = max(val_rank, key=val_rank.get)
    print(f"\n{len(train)} train images, {len(val)} validation + {len(synthetic)} synthetic; "
          f"{time.perf_counter() - start:.0f}s")
    header = "| blocks | val image AUROC | val AU-PRO(0.05) |" + (
        f" {args.report_split} image AUROC | {args.report_split} AU-PRO(0.05) |" if args.report_split else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for combo in COMBOS:
        row = [results["validation"][combo]["image_auroc"], results["validation"][combo]["aupro_0.05"]]
        if args.report_split:
            row += [results[args.report_split][combo]["image_auroc"], results[args.report_split][combo]["aupro_0.05"]]
        mark = " (chosen)" if combo == best else ""
        print(f"| {','.join(map(str, combo))}{mark} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print(json.dumps({"chosen": best}))


if __name__ == "__main__":
    main()
