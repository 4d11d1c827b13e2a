"""Does LoRA adaptation beat frozen DINOv2 features? One command for the whole table (issue 15).

Every variant is fitted with the library's own code (`detector.fit.fit_category`: train split,
thresholds from validation) and scored on `--split` (test_public) with `evaluation.evaluate`, for each
category and seed:

* ``frozen``       — no LoRA (the reference);
* ``lora-heads``   — today's `--lora` (classifier heads on synthetic anomalies), distance mode, and its
                     head mode as an extra row (same fit, one more evaluation);
* ``lora-compact`` — `--lora --lora-objective compact` (the backbone trained for the kNN distance,
                     selected on held-out defect types), distance mode.

Rows go to OUT/rows.jsonl as each finishes (a rerun skips finished rows, so an interrupted study
resumes), and OUT/table.md is rewritten after each: per category, mean ± spread over seeds (half the
difference of two seeds) of image AUROC, AU-PRO(0.05), SegF1, fit seconds, adapter + heads bytes and the
held-out selection criterion; then each variant's mean over categories against frozen, the issue's win
test, and the correlation of the criterion's gain with the test gain.

    PYTHONPATH=src python benchmarks/adaptation_study.py --data ../shared/data --backbone DIR --out OUT \\
        [--image-size 224] [--max-train-images 60] [--categories a,b] [--seeds 0,1] [--variants frozen,lora-compact]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.data import load_dataset
from anomalyvfm.detector.model_dir import ADAPTER_DIR, HEADS_FILE
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.detector.fit import Variant, fit_category
from anomalyvfm.evaluation.evaluate import evaluate, reset_peak_rss

CATEGORIES = ("magnetic_tile", "bottle", "kolektor", "ball_screw_drive")
VARIANTS = {"frozen": None, "lora-heads": AdaptationConfig(), "lora-compact": AdaptationConfig(objective="compact")}
EXTRA_MODES = {"lora-heads": ("head",)}  # further score modes evaluated on the same fit
METRICS = ("image_auroc", "aupro_0.05", "seg_f1")
WIN = 0.02  # the bar: mean gain in image AUROC and in AU-PRO(0.05) ...
MAX_LOSS = 0.01  # ... losing no category by more than this


def row_key(row: dict) -> tuple:
    return row["variant"], row["mode"], row["category"], row["seed"]


def read_rows(path: Path) -> list[dict]:
    """Finished rows; a line cut short by a kill is ignored (its run is redone)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def adapter_bytes(model: Path) -> int:
    files = [p for p in (model / ADAPTER_DIR).rglob("*") if p.is_file()] + [model / HEADS_FILE]
    return sum(p.stat().st_size for p in files if p.is_file())


def run_one(args, name: str, config: AdaptationConfig | None, category: str, seed: int, done: set) -> list[dict]:
    """Fit one variant on one category with one seed, evaluate every mode not yet done; return the rows."""
    modes = ("distance", *(() if args.distance_only else EXTRA_MODES.get(name, ())))
    if all((name, mode, category, seed) in done for mode in modes):
        return []
    if config is not None and args.lora_steps:
        config = replace(config, steps=args.lora_steps)
    settings = Settings(backbone=args.backbone, image_size=args.image_size, seed=seed, lora=config)
    variant = Variant(name, settings, Runtime(), args.max_train_images)
    reset_peak_rss()
    detector, fit_seconds = fit_category(args.data, category, "mvtec_ad2", variant)
    folder = args.out / "runs" / name / category / f"seed{seed}"
    model = detector.save(folder / "model", store_backbone=False)
    lora = detector.record.lora or {}
    common = {"variant": name, "category": category, "seed": seed, "fit_seconds": round(fit_seconds, 1),
              "lora_seconds": lora.get("seconds"), "adapter_bytes": adapter_bytes(model) if config else 0,
              "steps_run": lora.get("steps_run"), "best_step": lora.get("best_step"),
              "selection_score": lora.get("best_validation_score"), "held_out_frozen": lora.get("held_out_frozen"),
              "held_out_kept": lora.get("held_out_kept"), "image_size": args.image_size,
              "max_train_images": args.max_train_images}
    dataset = load_dataset(args.data, category, "mvtec_ad2", seed)
    rows = []
    for mode in modes:
        if (name, mode, category, seed) in done:
            continue
        detector.use_score(mode)
        result = evaluate(detector, dataset, args.split, folder / f"eval_{mode}", progress=False)
        row = {**common, "mode": mode, **{k: result[k] for k in METRICS}, "eval_seconds": result["seconds"],
               "peak_rss_mb": result["peak_rss_mb"]}
        append_row(args.out / "rows.jsonl", row)
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {name}/{mode} {category} seed {seed}: image AUROC "
              f"{row['image_auroc']:.4f} AU-PRO(0.05) {row['aupro_0.05']:.4f} SegF1 {row['seg_f1']:.4f} "
              f"fit {fit_seconds:.0f}s", flush=True)
    if not args.keep_models:
        shutil.rmtree(folder / "model", ignore_errors=True)
    return rows


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and spread (half the range: for two seeds, half their difference) of a list of values."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def _fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, spread = _mean_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _correlation(x: list[float], y: list[float]) -> str:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return "n/a"
    from scipy.stats import pearsonr, spearmanr

    return f"Pearson {pearsonr(x, y)[0]:+.2f}, Spearman {spearmanr(x, y)[0]:+.2f} (n = {len(x)})"


def table(rows: list[dict]) -> str:
    """The markdown report: per category, per variant mean over categories, win test and correlation."""
    arms = sorted({(r["variant"], r["mode"]) for r in rows}, key=lambda a: (list(VARIANTS).index(a[0]) if a[0] in VARIANTS else 99, a[1]))
    categories = [c for c in CATEGORIES if any(r["category"] == c for r in rows)]
    categories += sorted({r["category"] for r in rows} - set(categories))
    seeds = sorted({r["seed"] for r in rows})
    pick = {row_key(r): r for r in rows}
    lines = ["| variant | mode | category | image AUROC | AU-PRO(0.05) | SegF1 | fit s | adapter + heads bytes "
             "| criterion: kept (frozen) | best step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, mode in arms:
        for category in categories:
            got = [pick[variant, mode, category, s] for s in seeds if (variant, mode, category, s) in pick]
            if not got:
                continue
            criterion = (f"{_fmt([r['held_out_kept'] for r in got])} ({_fmt([r['held_out_frozen'] for r in got])})"
                         if got[0]["held_out_kept"] is not None else "–")
            steps = ", ".join(str(r["best_step"]) for r in got) if got[0]["best_step"] is not None else "–"
            lines.append(f"| {variant} | {mode} | {category} | " + " | ".join(_fmt([r[m] for r in got]) for m in METRICS)
                         + f" | {_fmt([r['fit_seconds'] for r in got], 0)} | {_fmt([r['adapter_bytes'] for r in got], 0)} "
                           f"| {criterion} | {steps} |")
    lines += ["", "Mean over categories (± half the difference between the seeds' means); Δ against frozen, "
              "worst category Δ (image AUROC / AU-PRO(0.05)):", "",
              "| variant | mode | image AUROC | AU-PRO(0.05) | SegF1 | Δ image AUROC | Δ AU-PRO | worst Δ | wins? |",
              "|---|---|---|---|---|---|---|---|---|"]
    complete = lambda v, m: all((v, m, c, s) in pick for c in categories for s in seeds)
    means = {}
    for variant, mode in arms:
        if not complete(variant, mode):
            lines.append(f"| {variant} | {mode} | (incomplete) | | | | | | |")
            continue
        per_seed = {m: [float(np.mean([pick[variant, mode, c, s][m] for c in categories])) for s in seeds] for m in METRICS}
        means[variant, mode] = per_seed
        cells = " | ".join(_fmt(per_seed[m]) for m in METRICS)
        if ("frozen", "distance") in means and variant != "frozen":
            base = means["frozen", "distance"]
            gain = {m: float(np.mean(per_seed[m]) - np.mean(base[m])) for m in METRICS[:2]}
            worst = {m: min(np.mean([pick[variant, mode, c, s][m] - pick["frozen", "distance", c, s][m] for s in seeds])
                            for c in categories) for m in METRICS[:2]}
            wins = (gain["image_auroc"] >= WIN and gain["aupro_0.05"] >= WIN
                    and min(worst.values()) >= -MAX_LOSS)
            lines.append(f"| {variant} | {mode} | {cells} | {gain['image_auroc']:+.3f} | {gain['aupro_0.05']:+.3f} "
                         f"| {worst['image_auroc']:+.3f} / {worst['aupro_0.05']:+.3f} | {'yes' if wins else 'no'} |")
        else:
            lines.append(f"| {variant} | {mode} | {cells} | | | | |")
    lines += ["", "Held-out selection criterion (kNN image AUROC + patch AP on validation crops with unseen defect "
              "types, 0–2) against test_public, over LoRA runs (category × seed), distance mode:", ""]
    for variant, mode in arms:
        runs = [r for r in rows if r["variant"] == variant and r["mode"] == mode and r["held_out_kept"] is not None
                and ("frozen", "distance", r["category"], r["seed"]) in pick]
        if not runs or mode != "distance":
            continue
        crit_gain = [r["held_out_kept"] - r["held_out_frozen"] for r in runs]
        for metric in METRICS[:2]:
            test_gain = [r[metric] - pick["frozen", "distance", r["category"], r["seed"]][metric] for r in runs]
            lines.append(f"- {variant}: criterion gain over frozen vs test {metric} gain over frozen: "
                         f"{_correlation(crit_gain, test_gain)}")
        lines.append(f"- {variant}: criterion (kept) vs test image AUROC, absolute: "
                     f"{_correlation([r['held_out_kept'] for r in runs], [r['image_auroc'] for r in runs])}")
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[dict]) -> None:
    tmp = out / "table.md.tmp"
    tmp.write_text(table(rows))
    tmp.replace(out / "table.md")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec AD 2-layout root")
    parser.add_argument("--backbone", required=True, help="DINOv2 directory or hub id")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-train-images", type=int, default=60)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"among {', '.join(VARIANTS)}")
    parser.add_argument("--lora-steps", type=int, default=0, help="override the LoRA steps (0: the default)")
    parser.add_argument("--split", default="test_public")
    parser.add_argument("--distance-only", action="store_true", help="skip the extra head-mode evaluation of lora-heads")
    parser.add_argument("--table-only", action="store_true", help="only rewrite OUT/table.md from OUT/rows.jsonl")
    parser.add_argument("--keep-models", action="store_true", help="keep each fitted model directory")
    args = parser.parse_args(argv)
    args.categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(args.out / "rows.jsonl")
    done = {row_key(r) for r in rows}
    # seeds outermost: a study stopped early still has every variant on every category for seed 0
    for seed in [] if args.table_only else args.seeds:
        for category in args.categories:
            for name in args.variants:
                new = run_one(args, name, VARIANTS[name], category, seed, done)
                rows += new
                done |= {row_key(r) for r in new}
                if new:
                    write_table(args.out, rows)
    write_table(args.out, rows)
    sys.stdout.write((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
