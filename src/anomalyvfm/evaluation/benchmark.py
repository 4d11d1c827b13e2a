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
from anomalyvfm.evaluation.evaluate import PER_IMAGE_NAME, evaluate, reset_peak_rss
from anomalyvfm.metrics import PerImage, bootstrap
from anomalyvfm.metrics.bootstrap import INTERVAL_METRICS
from anomalyvfm.outputs import open_text, write_text

METRICS = ("image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "seg_f1", "class_f1", "f1_max_oracle",
           "seg_f1_max_oracle")
INTERVAL_NOTE = "\n[low, high]: 95 % bootstrap interval over the test images of each category.\n"
BOUNDS = tuple(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("low", "high"))  # 95 % bootstrap intervals
DISAGREEMENTS = ("outlined_but_passed", "flagged_without_outline")  # images whose verdict and outline disagree
COLUMNS = ("variant", "category", *METRICS, *DISAGREEMENTS, "fit_seconds", "images_per_second", "peak_rss_mb", *BOUNDS,
           "settings")
SHOWN = tuple(c for c in COLUMNS if c not in BOUNDS)  # markdown and index.html: intervals inside the metric's cell
AVERAGED = tuple(c for c in SHOWN[2:-1])  # the mean row's columns (an interval per category has no mean)


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


def interval_text(row: dict, column: str) -> str | float:
    """A figure with its interval (`0.912 [0.880, 0.940]`) when the row has one, else the value itself."""
    value, low, high = row.get(column), row.get(f"{column}_low"), row.get(f"{column}_high")
    if low is None or high is None or not isinstance(value, float):
        return value
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def shown_rows(rows: list[dict]) -> list[dict]:
    """The rows as the markdown and HTML tables show them: each figure with its interval in one cell."""
    return [{c: interval_text(r, c) if c in INTERVAL_METRICS else r.get(c, "") for c in SHOWN} for r in rows]


def markdown_table(rows: list[dict], columns: tuple[str, ...] = SHOWN) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    return head + "".join("| " + " | ".join(cell(r[c]) for c in columns) + " |\n" for r in rows)


def with_intervals(row: dict, intervals: dict[str, list[float]]) -> dict:
    """`row` with each interval's ends as `<metric>_low` and `<metric>_high` columns."""
    return {**row, **{f"{m}_{end}": bound for m, (low, high) in intervals.items()
                      for end, bound in (("low", low), ("high", high))}}


def paired_comparisons(variants: list[Variant], categories: list[str], out: Path, nested: bool,
                       rows: list[dict]) -> list[dict]:
    """Each later variant against the first on every category: the difference of each figure with interval
    figures and its 95 % paired bootstrap interval over the same test images (`metrics.bootstrap`)."""
    if len(variants) < 2 or not nested:
        return []
    value = {(r["variant"], r["category"]): r for r in rows}
    base = variants[0].name
    compared = []
    for variant in variants[1:]:
        for category in categories:
            first, second = (PerImage.load(out / name / category / "report" / PER_IMAGE_NAME)
                             for name in (variant.name, base))
            row = {"variant": variant.name, "baseline": base, "category": category}
            for metric in INTERVAL_METRICS:
                row[metric] = value[variant.name, category][metric] - value[base, category][metric]
            compared.append(with_intervals(row, bootstrap.paired_intervals(first, second)))
    return compared


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
            variant_rows.append(with_intervals({
                "variant": variant.name, "category": category, **{k: result[k] for k in (*METRICS, *DISAGREEMENTS)},
                "fit_seconds": round(fit_seconds, 1),
                "images_per_second": round(result["num_images"] / max(result["seconds"], 1e-9), 2),
                "peak_rss_mb": result["peak_rss_mb"], "settings": detector.summary()}, result["intervals"]))
        mean = {"variant": variant.name, "category": "mean", "settings": ""}
        for key in AVERAGED:
            mean[key] = float(np.nanmean([r[key] for r in variant_rows]))
        rows += variant_rows
        table += variant_rows + [mean]
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data": str(data), "layout": layout, "categories": categories, "split": split,
                "variants": {v.name: {"settings": to_dict(v.settings), "runtime": to_dict(v.runtime),
                                      "max_train_images": v.max_train_images} for v in variants}}
    comparisons = paired_comparisons(variants, categories, out, nested, rows)
    write_text(out / "results.json", json.dumps({"settings": settings, "results": table, "bootstrap": bootstrap.describe(),
                                                 "comparisons": comparisons}, indent=2, default=str) + "\n")
    with open_text(out / "results.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    markdown = markdown_table(shown_rows(table)) + INTERVAL_NOTE
    if comparisons:
        with open_text(out / "comparisons.csv") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(comparisons[0]))
            writer.writeheader()
            writer.writerows(comparisons)
        columns = ("variant", "baseline", "category", *INTERVAL_METRICS)
        markdown += (f"\nPaired differences (variant − {variants[0].name}) on the same test images, with their 95 % "
                     "paired bootstrap interval; an interval that excludes 0 is a difference beyond noise.\n\n"
                     + markdown_table([{c: interval_text(r, c) if c in INTERVAL_METRICS else r[c] for c in columns}
                                       for r in comparisons], columns))
    write_text(out / "results.md", markdown)
    html_report.write_index(out, shown_rows(table), reports, SHOWN)
    return rows
