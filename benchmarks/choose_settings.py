"""Choose feature blocks, scorer and image-score pooling using train + validation data only.

One pass over a subset of training images fits every candidate at once: a Mahalanobis scorer per block
combination (all blocks' streamed sums are shared, each combination takes its sub-block) and a kNN bank
for a few combinations. A second pass scores the validation good images plus synthetic anomalies made on
them (`anomalyvfm.data.synthesis`). The choice is the candidate with the best validation image AUROC +
AU-PRO(0.05). `--report-split test_public` also prints every candidate's test figures — information only,
never used to choose.

    python benchmarks/choose_settings.py --data ../shared/data --category magnetic_tile \
        --backbone DIR [--image-size 448] [--train-stride 4] [--report-split test_public]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from anomalyvfm.evaluation import metrics as M
from anomalyvfm.detector.auto import block_dims
from anomalyvfm.features.backbone import load_backbone
from anomalyvfm.data import load_dataset, load_mask, load_rgb
from anomalyvfm.features.extraction import extract_features
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.scoring.pooling import image_score
from anomalyvfm.scoring.scorers import KNNScorer, MahalanobisScorer
from anomalyvfm.data.synthesis import synthetic_set

MAHALANOBIS_COMBOS = [(4,), (6,), (8,), (9,), (10,), (12,), (4, 8), (5, 8), (6, 9), (7, 10), (8, 11), (9, 12), (4, 6, 8)]
KNN_COMBOS = [(6, 9), (4, 8), (8,)]
TOP_PERCENTS = (1.0, 5.0, 20.0)


def fit_candidates(backbone, paths, image_size: int) -> dict:
    """{(scorer name, combo): (fitted scorer, feature dims)} from one pass over `paths`."""
    full = MahalanobisScorer()
    dims = {c: block_dims(c, backbone.layers, backbone.hidden_size) for c in set(MAHALANOBIS_COMBOS) | set(KNN_COMBOS)}
    knn = {c: KNNScorer(coreset_ratio=0.1, max_candidates=30_000) for c in KNN_COMBOS}
    for item in extract_features(backbone, paths, image_size, 1, "fit candidates"):
        flat = item.features.reshape(-1, item.features.shape[-1])
        full.partial_fit(flat)
        for combo, scorer in knn.items():
            scorer.partial_fit(flat[:, dims[combo]])
    fitted = {}
    for combo in MAHALANOBIS_COMBOS:
        scorer = full.subset(dims[combo])
        scorer.finalize()
        fitted[("mahalanobis", combo)] = (scorer, dims[combo])
    for combo, scorer in knn.items():
        scorer.finalize()
        fitted[("knn", combo)] = (scorer, dims[combo])
    return fitted


def score_split(backbone, candidates: dict, images, masks, image_size: int) -> dict:
    """Metrics of every (candidate, top %) on `images`; `masks[i]` is None for good images."""
    labels = np.array([m is not None for m in masks], int)
    patch_maps = {key: ([], []) for key in candidates}  # per candidate: patch-score grids, float16 maps
    gt = []
    for item, mask in zip(extract_features(backbone, images, image_size, 1, "score candidates"), masks):
        h, w, dim = item.features.shape
        flat = item.features.reshape(h * w, dim)
        gt.append(mask if mask is not None else np.zeros(item.image_shape, bool))
        for key, (scorer, dims) in candidates.items():
            patch = scorer.score(flat[:, dims]).reshape(h, w)
            patch_maps[key][0].append(patch)
            patch_maps[key][1].append(anomaly_map(patch, item.processed_shape, item.image_shape).astype(np.float16))
    out = {}
    for key, (patches, maps) in patch_maps.items():
        aupro = M.aupro(gt, maps, 0.05)
        for top in TOP_PERCENTS:
            scores = np.array([image_score(p, top) for p in patches])
            out[key + (top,)] = {"image_auroc": M.image_auroc(labels, scores), "aupro_0.05": aupro}
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
    depth = max(max(c) for c in MAHALANOBIS_COMBOS + KNN_COMBOS)
    backbone = load_backbone(args.backbone, list(range(1, depth + 1)))
    start = time.perf_counter()
    train = [s.path for s in dataset.split("train")][:: args.train_stride]
    candidates = fit_candidates(backbone, train, args.image_size)
    val = [load_rgb(s.path) for s in dataset.split("validation")]
    synthetic = synthetic_set(val, per_stage=max(1, len(val) // 3), seed=0)
    results = {"validation": score_split(backbone, candidates, val + [img for img, _, _ in synthetic],
                                         [None] * len(val) + [m for _, m, _ in synthetic], args.image_size)}
    if args.report_split:
        test = dataset.split(args.report_split)
        results[args.report_split] = score_split(backbone, candidates, [s.path for s in test],
                                                 [load_mask(s.mask_path) if s.label else None for s in test],
                                                 args.image_size)
    rank = {k: r["aupro_0.05"] + r["image_auroc"] for k, r in results["validation"].items()}
    best = max(rank, key=rank.get)
    print(f"\nimage size {args.image_size}; {len(train)} train images, {len(val)} validation + {len(synthetic)} "
          f"synthetic; {time.perf_counter() - start:.0f}s")
    header = "| scorer | blocks | top % | val image AUROC | val AU-PRO(0.05) |"
    if args.report_split:
        header += f" {args.report_split} image AUROC | {args.report_split} AU-PRO(0.05) |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for key in sorted(results["validation"], key=rank.get, reverse=True):
        row = [results["validation"][key]["image_auroc"], results["validation"][key]["aupro_0.05"]]
        if args.report_split:
            row += [results[args.report_split][key]["image_auroc"], results[args.report_split][key]["aupro_0.05"]]
        mark = " **chosen**" if key == best else ""
        print(f"| {key[0]}{mark} | {','.join(map(str, key[1]))} | {key[2]:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    print(json.dumps({"chosen": {"scorer": best[0], "layers": best[1], "top_percent": best[2]}}))


if __name__ == "__main__":
    main()
