"""How many labelled defects do thresholds need? `fit --calibration-defects` against the normal-only default.

    python benchmarks/calibration_defects.py --models OUT --data ../shared/data [--categories all]

OUT/CAT/model is a model fitted with the defaults (e.g. by benchmarks/line_loop.py). Per category, every
validation and test_public image is scored once (maps kept in memory); then for k = 1, 3, 10 defect images
drawn from test_public/bad (seeds 0, 1, 2) the thresholds are set as `--calibration-defects` sets them
(`detector.defect_thresholds.defect_thresholds`, on validation + the drawn defects) and SegF1 and ClassF1 are
measured on the rest of test_public — the drawn images never count — against the model's own normal-only
thresholds and the oracles on the same rest. Output: OUT/calibration_defects.json and .md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anomalyvfm import metrics as M
from anomalyvfm.data import list_images, load_mask
from anomalyvfm.deploy.load import load_predictor
from anomalyvfm.detector.defect_thresholds import defect_thresholds

CATEGORIES = ("magnetic_tile", "bottle", "kolektor", "ball_screw_drive")
KS, SEEDS = (1, 3, 10), (0, 1, 2)


def scored(predictor, paths: list[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    preds = list(predictor.predict_iter(paths, None, decide=False))
    return np.array([p.score for p in preds]), [p.anomaly_map for p in preds]


def figures(scores, maps, labels, masks, image_t: float, pixel_t: float) -> dict[str, float]:
    return {"seg_f1": M.seg_f1(masks, maps, pixel_t), "class_f1": M.class_f1(labels, scores, image_t)}


def run_category(models: Path, data: Path, category: str) -> list[dict]:
    predictor = load_predictor(models / category / "model")
    t = predictor.thresholds()
    root = data / category
    val_scores, val_maps = scored(predictor, list_images(root / "validation" / "good"))
    good, bad = list_images(root / "test_public" / "good"), list_images(root / "test_public" / "bad")
    good_scores, good_maps = scored(predictor, good)
    bad_scores, bad_maps = scored(predictor, bad)
    bad_masks = [load_mask(root / "test_public" / "ground_truth" / "bad" / f"{p.stem}_mask.png", m.shape)
                 for p, m in zip(bad, bad_maps)]
    rows = []
    for k in KS:
        for seed in SEEDS:
            drawn = set(np.random.default_rng(seed).choice(len(bad), size=min(k, len(bad) - 1), replace=False).tolist())
            rest = [i for i in range(len(bad)) if i not in drawn]
            image_t, pixel_t, _ = defect_thresholds(val_scores, val_maps, bad_scores[sorted(drawn)],
                                                    [bad_maps[i] for i in sorted(drawn)], [bad_masks[i] for i in sorted(drawn)])
            scores = np.r_[good_scores, bad_scores[rest]]
            maps = [*good_maps, *(bad_maps[i] for i in rest)]
            masks = [np.zeros(m.shape, bool) for m in good_maps] + [bad_masks[i] for i in rest]
            labels = np.r_[np.zeros(len(good)), np.ones(len(rest))]
            rows.append({"category": category, "k": k, "seed": seed,
                         "defects": figures(scores, maps, labels, masks, image_t, pixel_t),
                         "default": figures(scores, maps, labels, masks, t.image_threshold, t.pixel_threshold),
                         "seg_f1_oracle": M.seg_f1_max(masks, maps)[0], "f1_oracle": M.f1_max(labels, scores)[0]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| category | k defects | SegF1 default → with defects (mean of 3 seeds) | SegF1 oracle | "
             "ratio to oracle | ClassF1 default → with defects | F1 oracle |", "|---|---|---|---|---|---|---|"]
    for category in dict.fromkeys(r["category"] for r in rows):
        for k in KS:
            group = [r for r in rows if r["category"] == category and r["k"] == k]
            mean = lambda f: float(np.mean([f(r) for r in group]))  # noqa: E731
            seg_d, seg_k, oracle = mean(lambda r: r["default"]["seg_f1"]), mean(lambda r: r["defects"]["seg_f1"]), mean(lambda r: r["seg_f1_oracle"])
            lines.append(f"| {category} | {k} | {seg_d:.3f} → {seg_k:.3f} | {oracle:.3f} | {seg_d / oracle:.2f} → "
                         f"{seg_k / oracle:.2f} | {mean(lambda r: r['default']['class_f1']):.3f} → "
                         f"{mean(lambda r: r['defects']['class_f1']):.3f} | {mean(lambda r: r['f1_oracle']):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--categories", default="all")
    args = parser.parse_args()
    categories = CATEGORIES if args.categories == "all" else args.categories.split(",")
    rows = [row for category in categories for row in run_category(Path(args.models), Path(args.data), category)]
    out = Path(args.models)
    (out / "calibration_defects.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "calibration_defects.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
