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

import torch

from anomalyvfm.data import load_dataset, load_mask, load_rgb
from anomalyvfm.detector.candidates import block_dims, fit_candidates, score_candidates, with_synthetic_anomalies
from anomalyvfm.features.backbone import load_backbone
from anomalyvfm.scoring.scorers import KNNScorer, MahalanobisScorer

MAHALANOBIS_COMBOS = [(4,), (6,), (8,), (9,), (10,), (12,), (4, 8), (5, 8), (6, 9), (7, 10), (8, 11), (9, 12), (4, 6, 8)]
KNN_COMBOS = [(6, 9), (4, 8), (8,)]
TOP_PERCENTS = (1.0, 5.0, 20.0)


def fit_all(backbone, paths, image_size: int) -> dict:
    """{(scorer name, combo): (fitted scorer, feature dims)} from one pass over `paths`.

    Every Mahalanobis combination is a sub-block of one scorer's streamed sums over all blocks.
    """
    dims = {c: block_dims(c, backbone.layers, backbone.hidden_size) for c in set(MAHALANOBIS_COMBOS) | set(KNN_COMBOS)}
    full = MahalanobisScorer()
    streamed = {("mahalanobis", "all"): (full, torch.arange(backbone.feature_dim))}
    streamed |= {("knn", c): (KNNScorer(coreset_ratio=0.1, max_candidates=30_000), dims[c]) for c in KNN_COMBOS}
    fit_candidates(backbone, streamed, paths, image_size, None, 1, "fit candidates")
    fitted = {}
    for combo in MAHALANOBIS_COMBOS:
        fitted[("mahalanobis", combo)] = (full.subset(dims[combo]), dims[combo])
    for combo in KNN_COMBOS:
        fitted[("knn", combo)] = streamed[("knn", combo)]
    for scorer, _ in fitted.values():
        scorer.finalize()
    return fitted


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
    candidates = fit_all(backbone, train, args.image_size)
    val = [load_rgb(s.path) for s in dataset.split("validation")]
    images, masks = with_synthetic_anomalies(val, seed=0)

    def score(images, masks) -> dict:
        figures = score_candidates(backbone, candidates, images, masks, args.image_size, None, 1, 4.0, TOP_PERCENTS,
                                   "score candidates")
        return {key + (top,): f for (key, top), f in figures.items()}

    results = {"validation": score(images, masks)}
    if args.report_split:
        test = dataset.split(args.report_split)
        results[args.report_split] = score([s.path for s in test], [load_mask(s.mask_path) if s.label else None for s in test])
    rank = {k: r["aupro_0.05"] + r["image_auroc"] for k, r in results["validation"].items()}
    best = max(rank, key=rank.get)
    print(f"\nimage size {args.image_size}; {len(train)} train images, {len(val)} validation + {len(images) - len(val)} "
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
