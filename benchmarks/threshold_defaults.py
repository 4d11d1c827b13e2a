"""Threshold rule default across the four categories (issue 22, item 4): sigma 3 on validation vs a 1 % budget.

Reuses the maps cached by `threshold_rules.py` (the maps do not depend on the threshold rule): for each category a
second fit with `--threshold-rule budget` on the same training images gives the budget thresholds (image: 1 % of
out-of-fold training image scores; pixel: 1 % of their per-image map maxima); the cached validation scores are
re-scored by that model as a check that both fits share one bank. Both threshold pairs are then applied to the
cached maps with today's mask default (MEBin on rejected images only), and on the selection set (validation/good
+ synthetic anomalies) SegF1 and ClassF1 are compared with paired bootstrap intervals; test_public is only reported.

The rule, fixed before the run: `budget` replaces `sigma` as the default only if its paired SegF1 difference on
the selection set is above 0 beyond the interval on every category and its paired ClassF1 difference is not
below 0 beyond the interval on any category.

    PYTHONPATH=src python benchmarks/threshold_defaults.py --data ../shared/data --backbone DIR \
        --cache /tmp/s2/cache --out benchmarks/results/threshold_defaults
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from anomalyvfm.data import load_dataset
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.detector.settings import Settings
from anomalyvfm.metrics import bootstrap
from mask_cuts import load_split, reduce
from threshold_rules import CATEGORIES, fit_images

CUT = "mebin"  # today's default cut, on rejected images only
FIGURES = ("seg_f1", "class_f1")


def budget_fit(data: Path, category: str, backbone: str, folder: Path) -> dict:
    """Fit with the budget rule on the cached fit's training images (once); its thresholds and a bank check."""
    done = folder / "budget.json"
    if done.exists():
        return json.loads(done.read_text())
    train, validation = fit_images(load_dataset(data, category), category)
    start = time.perf_counter()
    detector = AnomalyDetector(Settings(backbone=backbone, threshold_rule="budget")).fit(train, validation, progress=False)
    seconds = time.perf_counter() - start
    cached = load_split(folder / "validation.npz")[0]
    scores = [p.score for p in detector.predict_iter(validation[:3], None, decide=False)]
    t = detector.thresholds()
    record = {"image_threshold": t.image_threshold, "pixel_threshold": t.pixel_threshold, "fit_seconds": round(seconds, 1),
              "same_bank_max_rel": float(np.max(np.abs(np.array(scores) - cached[:3]) / np.abs(cached[:3])))}
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def measure(folder: Path, budget: dict) -> list[dict]:
    """Both rules' figures on the selection set and test_public, with paired intervals of budget − sigma."""
    sigma = json.loads((folder / "fit.json").read_text())
    validation, synthetic = load_split(folder / "validation.npz"), load_split(folder / "synthetic.npz")
    splits = {"selection": tuple(np.concatenate([a, b]) if isinstance(a, np.ndarray) else a + b
                                 for a, b in zip(validation, synthetic)),
              "test": load_split(folder / "test_public.npz")}
    normal_mean = float(np.mean([m.astype(np.float64).mean() for m in validation[2]]))
    rows, base = [], {}
    for rule, source in (("sigma", sigma), ("budget", budget)):
        row = {"category": folder.name, "rule": rule, "thresholds": [source["image_threshold"], source["pixel_threshold"]]}
        for name, split in splits.items():
            result, images = reduce(split, tuple(row["thresholds"]), normal_mean, CUT, True)
            base.setdefault(name, images)
            intervals, paired = bootstrap.intervals(images), bootstrap.paired_intervals(images, base[name])
            for figure in FIGURES:
                row[f"{name}_{figure}"] = result[figure]
                row[f"{name}_{figure}_interval"] = intervals[figure]
                row[f"{name}_{figure}_vs_sigma"] = paired[figure]
            row[f"{name}_oracles"] = [result["f1_max_oracle"], result["seg_f1_max_oracle"]]
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> str:
    budget = [r for r in rows if r["rule"] == "budget"]
    seg = [r["category"] for r in budget if r["selection_seg_f1_vs_sigma"][0] > 0]
    hurt = [r["category"] for r in budget if r["selection_class_f1_vs_sigma"][1] < 0]
    chosen = "budget" if len(seg) == len(budget) and not hurt else "sigma (kept)"
    return (f"- budget SegF1 beyond the interval on {len(seg)} of {len(budget)} ({', '.join(seg) or 'none'})\n"
            f"- budget ClassF1 below beyond the interval on {len(hurt)} ({', '.join(hurt) or 'none'})\n\n"
            f"Chosen by the rule: **{chosen}**\n")


def table(rows: list[dict]) -> str:
    def cell(r: dict, key: str) -> str:
        low, high = r[f"{key}_vs_sigma"]
        return f"{r[key]:.3f} [{low:+.3f}, {high:+.3f}]"

    head = ("| category | rule | image / pixel threshold | SegF1 val+syn [budget − sigma] | ClassF1 val+syn | "
            "SegF1 test | ClassF1 test | test oracles ClassF1 / SegF1 |\n|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['category']} | {r['rule']} | {r['thresholds'][0]:.4g} / {r['thresholds'][1]:.4g} "
        f"| {cell(r, 'selection_seg_f1')} | {cell(r, 'selection_class_f1')} | {cell(r, 'test_seg_f1')} "
        f"| {cell(r, 'test_class_f1')} | {r['test_oracles'][0]:.3f} / {r['test_oracles'][1]:.3f} |\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    rows = []
    for category in args.categories.split(","):
        folder = args.cache / category
        budget = budget_fit(args.data, category, args.backbone, folder)
        print(category, json.dumps(budget), flush=True)
        rows += measure(folder, budget)
    text = table(rows) + "\n" + verdict(rows)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
