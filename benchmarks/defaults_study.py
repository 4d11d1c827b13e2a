"""Defaults chosen across categories on train + validation + synthetic anomalies (issue 13, item 3).

One rule for every category: image size, feature blocks, scorer, kNN coreset ratio, smoothing σ and
image-score pooling are chosen by the mean over categories of validation image AUROC + AU-PRO(0.05)
(validation good images against synthetic anomalies made on up to 24 of them, `data.synthesis`, the
protocol of `--auto`); candidates within `TIE` of the best are ties and the cheapest of them wins
(smaller image, shallower blocks, Mahalanobis before kNN, smaller bank; then today's σ and pooling).
test_public is only reported: each candidate's figures at its own sigma-3 thresholds from the validation
good images, exactly as `fit` sets them, and the oracles `seg_f1_max_oracle` / `f1_max_oracle`.

Stage 1 runs each (category, view) in its own process (own peak RSS; resumable: one JSON line per
candidate in OUT/rows.jsonl): the backbone runs once over evenly spaced training images, the validation
good images, the synthetic anomalies and test_public. Every candidate comes from those features:
- kNN per block set, each coreset ratio a *prefix* of one greedy k-center run at the largest ratio (greedy
  selection is prefix-consistent: its first k rows are the greedy coreset of size k), scored from one
  similarity product by running maxima over the prefixes, so smaller banks cost nothing extra;
- Mahalanobis per block set, sub-blocks of one streamed covariance;
- σ and top-% pooling are post-processing of the same patch-score grids.
Tiles (ball_screw_drive and kolektor: long images with small defects) are a per-category option compared
with the whole image under the same rule, reported apart: they are not a view every category has.

Stage 2 (`--table`, also run after stage 1) prints and writes OUT/results.md.

    python benchmarks/defaults_study.py --data ../shared/data --backbone DIR --out OUT
    python benchmarks/defaults_study.py --out OUT --table
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_IMAGES = 60  # evenly spaced: bounds CPU time; the same for every candidate
SYNTHETIC_BASE = 24  # validation good images that synthetic anomalies are made on
BLOCK_SETS = ((4, 8), (6, 9))  # kNN; today's default first
MAHALANOBIS_BLOCK_SETS = ((4, 8), (6, 9), (4, 6, 8))
RATIOS = (0.01, 0.03, 0.1)  # kNN coreset ratios: prefixes of the greedy run at the largest
SIGMAS = (2.0, 4.0, 8.0)
TOP_PERCENTS = (0.5, 1.0, 2.0, 5.0)
VIEWS = ("224", "336", "448")
TILES = "tiles448x1.5"  # tiles of 448 px overlapping by 56 over the image enlarged 1.5x
TILE_CATEGORIES = ("ball_screw_drive", "kolektor")
DEFAULT = {"view": "448", "scorer": "knn", "blocks": [4, 8], "ratio": 0.1, "sigma": 4.0, "top": 1.0}
TIE = 0.005  # on the mean of validation image AUROC + AU-PRO(0.05): differences below it are noise here
TEST_KEYS = ("image_auroc", "aupro_0.05", "seg_f1", "seg_f1_max_oracle", "class_f1", "f1_max_oracle")


def _tiling(view: str):
    from anomalyvfm.features.tiles import Tiling

    return (448, Tiling(448, 56, 1.5)) if view == TILES else (int(view), None)


def _candidates(backbone, train, size, tiling, block_sets) -> dict:
    """{(scorer, blocks): callable(flat features) -> {ratio or None: patch scores}} fitted on `train`."""
    import torch

    from anomalyvfm.detector.candidates import block_dims
    from anomalyvfm.features.extraction import FailedImage, extract_features
    from anomalyvfm.scoring.distances import prefix_knn_distances
    from anomalyvfm.scoring.scorers import KNNScorer, MahalanobisScorer

    dims = {b: block_dims(b, backbone.layers, backbone.hidden_size) for b in set(block_sets) | set(MAHALANOBIS_BLOCK_SETS)}
    knn = {b: KNNScorer(coreset_ratio=max(RATIOS)) for b in block_sets}
    full = MahalanobisScorer()
    for item in extract_features(backbone, train, size, 8, "train", tiling):
        if isinstance(item, FailedImage):
            raise SystemExit(item.error)
        flat = item.features.reshape(-1, item.features.shape[-1])
        full.partial_fit(flat)
        for b, scorer in knn.items():
            scorer.partial_fit(flat[:, dims[b]])
    found = {}
    for b, scorer in knn.items():
        scorer.finalize()
        bank = scorer.bank.numpy()
        prefixes = {r: max(1, round(len(bank) * r / max(RATIOS))) for r in RATIOS}
        found["knn", b] = (lambda flat, bank=bank, d=dims[b], prefixes=prefixes:
                           prefix_knn_distances(flat[:, d], bank, prefixes))
    for b in MAHALANOBIS_BLOCK_SETS if set(MAHALANOBIS_BLOCK_SETS) <= set(dims) else ():
        sub = full.subset(dims[b])
        sub.finalize()
        found["mahalanobis", b] = lambda flat, sub=sub, d=dims[b]: {None: sub.score(torch.as_tensor(flat[:, d])).numpy()}
    return found


def run_view(data: str, backbone_dir: str, category: str, view: str) -> list[dict]:
    """Every candidate of one (category, view): validation and test_public figures."""
    from anomalyvfm.data import evenly_spaced, load_dataset, load_mask, load_rgb
    from anomalyvfm.detector.calibration import thresholds_from
    from anomalyvfm.detector.candidates import with_synthetic_anomalies
    from anomalyvfm.detector.settings import Settings
    from anomalyvfm import metrics as M
    from anomalyvfm.evaluation.evaluate import peak_rss_mb
    from anomalyvfm.features.backbone import load_backbone
    from anomalyvfm.features.extraction import FailedImage, extract_features
    from anomalyvfm.maps.anomaly_maps import anomaly_map
    from anomalyvfm.maps.thresholds import NormalScores
    from anomalyvfm.scoring.pooling import image_score

    size, tiling = _tiling(view)
    block_sets = BLOCK_SETS[:1] if tiling else BLOCK_SETS
    dataset = load_dataset(data, category)
    train = evenly_spaced([s.path for s in dataset.split("train")], TRAIN_IMAGES)
    good = [load_rgb(s.path) for s in dataset.split("validation")]
    base = evenly_spaced(good, SYNTHETIC_BASE)
    with_synthetic, synthetic_masks = with_synthetic_anomalies(base, seed=0)
    test = dataset.split("test_public")
    backbone = load_backbone(backbone_dir, sorted({b for s in block_sets + MAHALANOBIS_BLOCK_SETS for b in s}))
    start = time.perf_counter()
    candidates = _candidates(backbone, train, size, tiling, block_sets)
    fit_seconds = time.perf_counter() - start
    splits = {"validation": (good + with_synthetic[len(base):], [None] * len(good) + synthetic_masks[len(base):]),
              "test": ([s.path for s in test], [s.mask_path if s.label else None for s in test])}
    grids: dict[tuple, list[np.ndarray]] = {}  # (split, (scorer, blocks), ratio) -> patch-score grids
    shapes: dict[str, list[tuple]] = {split: [] for split in splits}  # (processed, original) shape per image
    seconds = {}
    for split, (images, _) in splits.items():
        start = time.perf_counter()
        for item in extract_features(backbone, images, size, 8, split, tiling):
            if isinstance(item, FailedImage):
                raise SystemExit(item.error)
            h, w, dim = item.features.shape
            flat = item.features.reshape(h * w, dim).numpy()
            for key, score in candidates.items():
                for ratio, patch_scores in score(flat).items():
                    grids.setdefault((split, key, ratio), []).append(patch_scores.reshape(h, w))
            shapes[split].append((item.processed_shape, item.image_shape))
        seconds[split] = time.perf_counter() - start
    rules = Settings().threshold_rules()
    labels = {split: np.array([m is not None for m in masks]) for split, (_, masks) in splits.items()}
    truth = {"validation": [m if m is not None else np.zeros(s, bool)
                            for m, (_, s) in zip(splits["validation"][1], shapes["validation"])],
             "test": [load_mask(p, s) if p else np.zeros(s, bool) for p, (_, s) in zip(splits["test"][1], shapes["test"])]}
    good_val = ~labels["validation"]
    rows = []
    for (scorer, blocks), ratio in [(key, ratio) for split, key, ratio in grids if split == "validation"]:
        mine = {split: grids[split, (scorer, blocks), ratio] for split in splits}
        scores = {split: {top: np.array([image_score(g, top) for g in mine[split]]) for top in TOP_PERCENTS}
                  for split in splits}
        for sigma in SIGMAS:
            maps = {split: [anomaly_map(g, p, s, sigma).astype(np.float16) for g, (p, s) in zip(mine[split], shapes[split])]
                    for split in splits}
            val_aupro = M.aupro(truth["validation"], maps["validation"], 0.05)
            pixels = NormalScores()
            for m in (m for m, good in zip(maps["validation"], good_val) if good):
                pixels.update(m.astype(np.float32))
            pixel_figures = None
            for top in TOP_PERCENTS:
                normal = NormalScores()
                normal.update(scores["validation"][top][good_val])
                t = thresholds_from(normal, pixels, rules)
                test_scores = scores["test"][top]
                if pixel_figures is None:  # the pixel figures do not depend on the pooling
                    pixel_figures = M.evaluate_images(labels["test"], test_scores, truth["test"], maps["test"],
                                                      t.image_threshold, t.pixel_threshold)[0]
                test_figures = {**pixel_figures, "image_auroc": M.image_auroc(labels["test"], test_scores),
                                "class_f1": M.class_f1(labels["test"], test_scores, t.image_threshold),
                                "f1_max_oracle": M.f1_max(labels["test"], test_scores)[0]}
                rows.append({"category": category, "view": view, "scorer": scorer, "blocks": list(blocks),
                             "ratio": ratio, "sigma": sigma, "top": top,
                             "val_image_auroc": round(M.image_auroc(labels["validation"], scores["validation"][top]), 4),
                             "val_aupro_0.05": round(val_aupro, 4),
                             **{k: round(float(test_figures[k]), 4) for k in TEST_KEYS}})
    shared = {"train_images": len(train), "validation_images": len(good), "synthetic_images": len(synthetic_masks) - len(base),
              "test_images": len(test), "fit_seconds": round(fit_seconds, 1),
              "test_images_per_second_all_candidates": round(len(test) / seconds["test"], 2),
              "peak_rss_mb": round(peak_rss_mb())}
    return [{**row, **shared} for row in rows]


def _key(row: dict) -> tuple:
    return row["view"], row["scorer"], tuple(row["blocks"]), row["ratio"], row["sigma"], row["top"]


def cost(key: tuple) -> tuple:
    """Cheaper first: image size (backbone time grows with it), depth of the deepest block, scorer (a
    Mahalanobis product is smaller than a kNN search), bank size; then distance from today's σ and pooling."""
    view, scorer, blocks, ratio, sigma, top = key
    return (int(view) if view.isdigit() else 10_000, max(blocks), scorer != "mahalanobis", ratio or 0,
            abs(sigma - DEFAULT["sigma"]), abs(top - DEFAULT["top"]))


def choose(rows: list[dict], categories: list[str]) -> tuple[tuple, dict[tuple, dict]]:
    """The chosen key and every key's mean figures over `categories` (keys present for all of them)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        if row["category"] in categories:
            by_key.setdefault(_key(row), {})[row["category"]] = row
    means = {key: {k: float(np.mean([found[c][k] for c in categories]))
                   for k in ("val_image_auroc", "val_aupro_0.05", *TEST_KEYS, "fit_seconds", "peak_rss_mb")}
             for key, found in by_key.items() if set(found) == set(categories)}
    for figures in means.values():
        figures["rank"] = figures["val_image_auroc"] + figures["val_aupro_0.05"]
    best = max(figures["rank"] for figures in means.values())
    chosen = min((key for key, f in means.items() if f["rank"] >= best - TIE), key=cost)
    return chosen, means


def _name(key: tuple) -> str:
    view, scorer, blocks, ratio, sigma, top = key
    bank = f" {ratio:g}" if ratio else ""
    return f"{view} | {scorer}{bank} | {','.join(map(str, blocks))} | {sigma:g} | {top:g}"


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    categories = sorted({r["category"] for r in rows})
    whole = [r for r in rows if r["view"] != TILES]
    chosen, means = choose(whole, categories)
    default = _key({**DEFAULT, "blocks": DEFAULT["blocks"]})
    ranked = sorted(means, key=lambda k: -means[k]["rank"])
    lines = [f"Categories: {', '.join(categories)}; {len(means)} candidates; rule: max mean validation image AUROC + "
             f"AU-PRO(0.05), ties within {TIE} to the cheapest. test_public columns: reported only.\n",
             "| rank | view | scorer | blocks | σ | top % | val image AUROC | val AU-PRO | test image AUROC | test AU-PRO(0.05) "
             "| test SegF1 | SegF1 oracle | test ClassF1 | ClassF1 oracle |", "|" + "---|" * 14]
    for i, key in enumerate(ranked):
        if i < 15 or key in (chosen, default):
            f = means[key]
            mark = " **chosen**" if key == chosen else (" (today's default)" if key == default else "")
            lines.append(f"| {i + 1}{mark} | {_name(key)} | " + " | ".join(
                f"{f[k]:.3f}" for k in ("val_image_auroc", "val_aupro_0.05", *TEST_KEYS)) + " |")
    lines += ["", "Best mean validation figure for each value of one setting (the others free):", "",
              "| setting | value | best val AUROC + AU-PRO | its test image AUROC | its test AU-PRO(0.05) |", "|---|---|---|---|---|"]
    for index, name in enumerate(("view", "scorer", "blocks", "ratio", "sigma", "top")):
        for value in sorted({k[index] for k in means}, key=str):
            key = max((k for k in means if k[index] == value), key=lambda k: means[k]["rank"])
            f = means[key]
            lines.append(f"| {name} | {value} | {f['rank']:.3f} | {f['image_auroc']:.3f} | {f['aupro_0.05']:.3f} |")
    lines += ["", "The image score and the map from different candidates (e.g. deeper blocks for the image score only): "
              "the best of each part on validation, against the chosen single candidate:", "",
              "| part | candidate | val image AUROC | val AU-PRO | test image AUROC | test ClassF1 | test AU-PRO(0.05) | test SegF1 |",
              "|---|---|---|---|---|---|---|---|"]
    best_image = min((k for k in means if means[k]["val_image_auroc"] >= max(f["val_image_auroc"] for f in means.values()) - TIE),
                     key=cost)
    best_map = min((k for k in means if means[k]["val_aupro_0.05"] >= max(f["val_aupro_0.05"] for f in means.values()) - TIE),
                   key=cost)
    for part, key in (("image score", best_image), ("map", best_map), ("both (chosen)", chosen)):
        f = means[key]
        lines.append(f"| {part} | {_name(key).replace(' | ', ' · ')} | " + " | ".join(
            f"{f[k]:.3f}" for k in ("val_image_auroc", "val_aupro_0.05", "image_auroc", "class_f1", "aupro_0.05", "seg_f1")) + " |")
    lines += ["", "Per category, chosen and today's default (test_public; fit s and peak RSS of the study's process, "
              "which fits every candidate of the view at once):", "",
              "| category | setting | val image AUROC | val AU-PRO | " + " | ".join(TEST_KEYS) + " | fit s | peak RSS MB |",
              "|" + "---|" * (len(TEST_KEYS) + 6)]
    for category in categories:
        for label, key in (("chosen", chosen), ("default", default)):
            r = next((r for r in whole if r["category"] == category and _key(r) == key), None)
            if r is None:  # today's view not run (yet)
                continue
            lines.append(f"| {category} | {label} | {r['val_image_auroc']:.3f} | {r['val_aupro_0.05']:.3f} | "
                         + " | ".join(f"{r[k]:.3f}" for k in TEST_KEYS) + f" | {r['fit_seconds']} | {r['peak_rss_mb']} |")
    tiles = [r for r in rows if r["view"] == TILES]
    if tiles:
        lines += ["", f"Tiles ({TILES}) against the whole image, per category, same rule on its validation:", "",
                  "| category | view | scorer | σ | top % | val AUROC + AU-PRO | test image AUROC | test AU-PRO(0.05) | test SegF1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for category in sorted({r["category"] for r in tiles}):
            mine = [r for r in rows if r["category"] == category and tuple(r["blocks"]) == tuple(DEFAULT["blocks"])]
            for view in sorted({r["view"] for r in mine}):
                best = max((r for r in mine if r["view"] == view),
                           key=lambda r: r["val_image_auroc"] + r["val_aupro_0.05"])
                lines.append(f"| {category} | {view} | {best['scorer']} {best['ratio'] or ''} | {best['sigma']:g} | "
                             f"{best['top']:g} | {best['val_image_auroc'] + best['val_aupro_0.05']:.3f} | "
                             f"{best['image_auroc']:.3f} | {best['aupro_0.05']:.3f} | {best['seg_f1']:.3f} |")
    text = "\n".join(lines) + "\n" + json.dumps({"chosen": dict(zip(("view", "scorer", "blocks", "ratio", "sigma", "top"), chosen))}) + "\n"
    (out / "results.md.tmp").write_text(text)
    (out / "results.md.tmp").rename(out / "results.md")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--backbone")
    parser.add_argument("--out", required=True)
    parser.add_argument("--categories", default="all")
    parser.add_argument("--views", default=",".join(VIEWS), help=f"image sizes; {TILES} for tiles")
    parser.add_argument("--tiles", default=",".join(TILE_CATEGORIES), help="categories that also get the tiled view")
    parser.add_argument("--table", action="store_true", help="only print the table of OUT/rows.jsonl")
    parser.add_argument("--one", nargs=2, metavar=("CATEGORY", "VIEW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.one:
        print(json.dumps(run_view(args.data, args.backbone, *args.one)))
        return
    if not args.table:
        from anomalyvfm.evaluation.benchmark import find_categories

        out.mkdir(parents=True, exist_ok=True)
        done = set()
        if (out / "rows.jsonl").exists():
            done = {(r["category"], r["view"]) for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
        tiled = set(args.tiles.split(",")) if args.tiles else set()
        for category in find_categories(Path(args.data), args.categories):
            for view in [v for v in args.views.split(",") if v] + ([TILES] if category in tiled else []):
                if (category, view) in done:
                    continue
                command = [sys.executable, __file__, "--data", args.data, "--backbone", args.backbone, "--out", args.out,
                           "--one", category, view]
                start = time.perf_counter()
                found = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])
                with open(out / "rows.jsonl", "a") as handle:
                    handle.writelines(json.dumps(row) + "\n" for row in found)
                print(f"{category} {view}: {len(found)} candidates, {time.perf_counter() - start:.0f} s", flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
