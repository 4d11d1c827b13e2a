"""`anomalyvfm benchmark`: fit and evaluate each category with one set of options, then tabulate.

Each category gets its own model directory and report folder under `--out`; the tables give the
metrics per category and their mean, with fit time, evaluation throughput and peak memory.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np

from anomalyvfm.data import load_dataset
from anomalyvfm.errors import UserInputError
from anomalyvfm.evaluation import evaluate

COLUMNS = ("category", "image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "seg_f1", "class_f1",
           "f1_max_oracle", "fit_seconds", "images_per_second", "peak_rss_mb")


def find_categories(root: Path, spec: str) -> list[str]:
    """'all' → every sub-folder with `train/good`; otherwise the comma-separated names."""
    if not root.is_dir():
        raise UserInputError(f"{root}: no such data folder")
    if spec != "all":
        return [name.strip() for name in spec.split(",") if name.strip()]
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise UserInputError(f"{root}: no category folders with train/good found")
    return found


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return head + "".join("| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def run_benchmark(args: argparse.Namespace, fit_category: Callable) -> list[dict]:
    """Fit + evaluate each category of `args.data`; write results.json, results.csv and results.md."""
    out = Path(args.out)
    rows = []
    for category in find_categories(Path(args.data), args.categories):
        detector, fit_seconds = fit_category(args, category)
        detector.save(out / category / "model")
        dataset = load_dataset(args.data, category, args.layout, args.seed)
        result = evaluate(detector, dataset, args.split, out / category / "report")
        rows.append({"category": category, **{k: result[k] for k in COLUMNS[1:8]}, "fit_seconds": round(fit_seconds, 1),
                     "images_per_second": round(result["num_images"] / max(result["seconds"], 1e-9), 2),
                     "peak_rss_mb": result["peak_rss_mb"]})
    mean = {"category": "mean"}
    for key in COLUMNS[1:]:
        mean[key] = float(np.nanmean([r[key] for r in rows]))
    table = rows + [mean]
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": table}, indent=2, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    (out / "results.md").write_text(markdown_table(table))
    return rows
