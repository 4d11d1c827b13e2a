"""`anomalyvfm benchmark`: fit and evaluate each category, for one or several variants, then tabulate.

Each category gets its own model directory and report folder under `--out`; the tables give the
metrics per category and their mean, with fit time, evaluation throughput and peak memory.

Ablations: `--variant NAME=OPTIONS` names a set of fit options applied over the command's own, and
`--grid OPTION=V1,V2` adds an axis; every combination of the axes is run for every variant. Each
variant writes under `--out/<variant>/<category>` and gets its own rows; peak memory is reset before
each fit, so it is the variant's own, not the largest so far.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from anomalyvfm.data import load_dataset
from anomalyvfm.declare import to_dict
from anomalyvfm.detector.fit import Variant, fit_category
from anomalyvfm.errors import UserInputError
from anomalyvfm.evaluation import html_report
from anomalyvfm.evaluation.evaluate import evaluate, reset_peak_rss
from anomalyvfm.outputs import open_text, write_text

COLUMNS = ("variant", "category", "image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "seg_f1", "class_f1",
           "f1_max_oracle", "seg_f1_max_oracle", "fit_seconds", "images_per_second", "peak_rss_mb", "settings")
METRICS = COLUMNS[2:10]


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


def run_benchmark(data: Path, layout: str, categories: list[str], variants: list[Variant], split: str,
                  out: Path, nested: bool) -> list[dict]:
    """Fit + evaluate each variant on each category; write results.json, results.csv and results.md.

    Results go to `out/<variant>/<category>` when `nested`, else (a plain run) to `out/<category>`.
    """
    table, rows, reports = [], [], {}
    for variant in variants:
        variant_rows = []
        for category in categories:
            folder = out / variant.name / category if nested else out / category
            reset_peak_rss()
            detector, fit_seconds = fit_category(data, category, layout, variant)
            detector.save(folder / "model")
            dataset = load_dataset(data, category, layout, variant.settings.seed)
            result = evaluate(detector, dataset, split, folder / "report")
            reports[variant.name, category] = folder / "report" / html_report.REPORT_NAME
            variant_rows.append({"variant": variant.name, "category": category, **{k: result[k] for k in METRICS},
                                 "fit_seconds": round(fit_seconds, 1),
                                 "images_per_second": round(result["num_images"] / max(result["seconds"], 1e-9), 2),
                                 "peak_rss_mb": result["peak_rss_mb"], "settings": detector.summary()})
        mean = {"variant": variant.name, "category": "mean", "settings": ""}
        for key in COLUMNS[2:-1]:
            mean[key] = float(np.nanmean([r[key] for r in variant_rows]))
        rows += variant_rows
        table += variant_rows + [mean]
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data": str(data), "layout": layout, "categories": categories, "split": split,
                "variants": {v.name: {"settings": to_dict(v.settings), "runtime": to_dict(v.runtime),
                                      "max_train_images": v.max_train_images} for v in variants}}
    write_text(out / "results.json", json.dumps({"settings": settings, "results": table}, indent=2, default=str) + "\n")
    with open_text(out / "results.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    write_text(out / "results.md", markdown_table(table))
    html_report.write_index(out, table, reports, COLUMNS)
    return rows
