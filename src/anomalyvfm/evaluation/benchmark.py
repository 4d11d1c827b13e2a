"""`anomalyvfm benchmark`: fit and evaluate each category, for one or several variants, then tabulate.

Each category gets its own model directory and report folder under `--out`; the tables give the
metrics per category and their mean, with fit time, evaluation throughput and peak memory.

Ablations: `--variant NAME=OPTIONS` names a set of fit options applied over the command's own, and
`--grid OPTION=V1,V2` adds an axis; every combination of the axes is run for every variant. Each
variant writes under `--out/<variant>/<category>` and gets its own rows; peak memory is reset before
each fit, so it is the variant's own, not the largest so far.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import shlex
from pathlib import Path
from typing import Callable

import numpy as np

from anomalyvfm.data import load_dataset
from anomalyvfm.errors import UserInputError
from anomalyvfm.evaluation import html_report
from anomalyvfm.evaluation.evaluate import evaluate, reset_peak_rss

COLUMNS = ("variant", "category", "image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "seg_f1", "class_f1",
           "f1_max_oracle", "fit_seconds", "images_per_second", "peak_rss_mb", "settings")
METRICS = COLUMNS[2:9]


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


def variants(args: argparse.Namespace, parser_class: Callable[[], argparse.ArgumentParser]) -> list[tuple[str, argparse.Namespace]]:
    """(name, parsed options) of every variant: `--variant`s (or the command itself) x all `--grid` combinations."""
    named = []
    for spec in args.variant or ["default="]:
        name, sep, options = spec.partition("=")
        if not sep or not name.strip():
            raise UserInputError(f"--variant needs NAME=OPTIONS, got '{spec}'")
        named.append((name.strip(), options))
    axes = []
    for spec in args.grid:
        option, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserInputError(f"--grid needs OPTION=V1,V2, got '{spec}'")
        axes.append([(f"{option}={value}", f"--{option} {value}") for value in values.split(",")])
    result = []
    for (name, options), combo in itertools.product(named, itertools.product(*axes)):
        argv = shlex.split(" ".join([options, *(o for _, o in combo)]))
        # --data is required by the fit options; it is the command's own, the rest overrides a copy of args
        parsed = parser_class().parse_args(["--data", args.data, *argv], namespace=argparse.Namespace(**vars(args)))
        labels = [label for label, _ in combo]
        if name != "default" or not labels:  # a grid alone is named by its values only
            labels.insert(0, name)
        result.append(("+".join(labels), parsed))
    return result


def run_benchmark(args: argparse.Namespace, fit_category: Callable, parser_class: Callable) -> list[dict]:
    """Fit + evaluate each variant and category of `args.data`; write results.json, results.csv and results.md."""
    out = Path(args.out)
    runs = variants(args, parser_class)
    nested = len(runs) > 1 or bool(args.variant)  # a plain run keeps the flat <out>/<category> layout
    table, rows, reports = [], [], {}
    for name, variant_args in runs:
        variant_rows = []
        for category in find_categories(Path(args.data), args.categories):
            folder = out / name / category if nested else out / category
            reset_peak_rss()
            detector, fit_seconds = fit_category(variant_args, category)
            detector.save(folder / "model")
            dataset = load_dataset(args.data, category, args.layout, args.seed)
            result = evaluate(detector, dataset, args.split, folder / "report")
            reports[name, category] = folder / "report" / html_report.REPORT_NAME
            variant_rows.append({"variant": name, "category": category, **{k: result[k] for k in METRICS},
                                 "fit_seconds": round(fit_seconds, 1),
                                 "images_per_second": round(result["num_images"] / max(result["seconds"], 1e-9), 2),
                                 "peak_rss_mb": result["peak_rss_mb"], "settings": detector.config.summary()})
        mean = {"variant": name, "category": "mean", "settings": ""}
        for key in COLUMNS[2:-1]:
            mean[key] = float(np.nanmean([r[key] for r in variant_rows]))
        rows += variant_rows
        table += variant_rows + [mean]
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["variants"] = {name: {k: v for k, v in vars(a).items() if k != "func"} for name, a in runs}
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": table}, indent=2, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    (out / "results.md").write_text(markdown_table(table))
    html_report.write_index(out, table, reports, COLUMNS)
    return rows
