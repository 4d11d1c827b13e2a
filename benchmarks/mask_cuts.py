"""Mask cuts (`--binarize`, `--outline-only-flagged`) compared on maps cached by `threshold_rules.py`.

Every cut of `anomalyvfm.maps.binarize` (and the global cut with the one-patch minimum area, which is not a
setting, and hysteresis with its low threshold at other fractions of the way up from the normal mean) is applied
to the cached maps of each category at the model's own thresholds, with and without
"no outline on a pass verdict". SegF1 is measured on the *selection* set — validation/good plus the synthetic
anomalies made on validation images — with its 95 % bootstrap interval and the paired interval of its
difference from `global` (`anomalyvfm.metrics.bootstrap`); test_public is only reported, never used to
choose. The rule fixed before the run: a cut replaces `global` as the default only if its paired SegF1
difference on the selection set is above 0 beyond the interval on every category; of several such cuts, the
one with the highest mean selection SegF1 over the categories.

`--previous FILE.json` adds the rows of categories measured in an earlier run whose maps are no longer cached.

    PYTHONPATH=src nice -n 19 python benchmarks/threshold_rules.py --data ../shared/data --backbone DIR \
        --cache /tmp/threshold_cache --cache-only        # stage 1: maps (slow, once)
    PYTHONPATH=src python benchmarks/mask_cuts.py --cache /tmp/threshold_cache [--out table.md]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anomalyvfm.detector.settings import Settings
from anomalyvfm.metrics import bootstrap
from anomalyvfm import metrics as M
from anomalyvfm.maps.binarize import (BINARIZATIONS, MIN_AREA_PATCHES, defect_mask, grown_mask, hysteresis_mask,
                                      patch_side)

CATEGORIES = ("bottle", "ball_screw_drive", "kolektor", "magnetic_tile")
AREA_ONLY = "global, min area"  # the global cut with the one-patch minimum area (a candidate, not a setting)
FRACTIONS = (0.75, 0.9)  # other places of the hysteresis low threshold than HYSTERESIS_FRACTION (candidates)
GROWN = "mebin, grown"  # the regions of the global cut that hold a MEBin pixel (MEBin picks, global outlines)
# MEBin's regions grown down to the median of the good validation images' maxima (a level a typical good part
# reaches somewhere): large faint domes, whose MEBin cut is their core, outlined further (docs/results.md)
GROWN_TO_GOOD = "mebin, grown to good maxima"
CANDIDATES = (*BINARIZATIONS, AREA_ONLY, *(f"hysteresis@{f:g}" for f in FRACTIONS), GROWN, GROWN_TO_GOOD)


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(scores, labels, maps, masks) of a split cached by threshold_rules.py."""
    with np.load(path) as data:
        n = len(data["scores"])
        return (data["scores"], data["labels"], [data[f"map_{k}"] for k in range(n)],
                [data[f"mask_{k}"] for k in range(n)])


def cut(name: str, amap: np.ndarray, threshold: float, normal_mean: float, flagged: bool | None,
        good_peak: float) -> np.ndarray:
    """One candidate's mask of one map, at the model's thresholds and the default settings' patch size
    (`good_peak`: the median maximum of the good validation maps)."""
    side = patch_side(Settings(), amap.shape)
    if name in (GROWN, GROWN_TO_GOOD):
        seeds = defect_mask(amap, threshold, "mebin", is_anomalous=flagged)
        return grown_mask(amap, seeds, threshold if name == GROWN else max(threshold, good_peak))
    if name == AREA_ONLY or name.startswith("hysteresis@"):
        fraction = float(name.partition("@")[2] or 1)  # 1: the low threshold is the strict one
        low = normal_mean + fraction * (threshold - normal_mean)
        mask = hysteresis_mask(amap, threshold, low, MIN_AREA_PATCHES * side**2)
        return mask if flagged is None or flagged else np.zeros_like(mask)
    return defect_mask(amap, threshold, name, normal_mean=normal_mean, patch_side=side, is_anomalous=flagged,
                       good_maximum=good_peak)


def reduce(split: tuple, thresholds: tuple[float, float], normal_mean: float, good_peak: float, name: str,
           only_flagged: bool) -> tuple[dict, M.PerImage]:
    """The figures and per-image reduction of one split under one candidate cut."""
    scores, labels, maps, masks = split
    image_threshold, pixel_threshold = thresholds
    flagged = scores > image_threshold
    counts = np.array([M.mask_counts(g, cut(name, m, pixel_threshold, normal_mean, f if only_flagged else None, good_peak))
                       for g, m, f in zip(masks, maps, flagged)])
    return M.evaluate_images(labels, scores, masks, [m.astype(np.float16) for m in maps], image_threshold,
                             pixel_threshold, counts)


def measure(category_dir: Path) -> list[dict]:
    """One row per candidate: SegF1 on selection and test, intervals, paired difference from global."""
    fit = json.loads((category_dir / "fit.json").read_text())
    thresholds = (fit["image_threshold"], fit["pixel_threshold"])
    validation = load_split(category_dir / "validation.npz")
    synthetic = load_split(category_dir / "synthetic.npz")
    selection = tuple(np.concatenate([a, b]) if isinstance(a, np.ndarray) else a + b
                      for a, b in zip(validation, synthetic))
    test = load_split(category_dir / "test_public.npz")
    normal_mean = float(np.mean([m.astype(np.float64).mean() for m in validation[2]]))  # as calibration's mean
    good_peak = float(np.median([m.max() for m in validation[2]]))
    rows, base = [], {}
    for only_flagged in (False, True):
        for name in CANDIDATES:
            row = {"category": category_dir.name, "cut": name, "only_flagged": only_flagged}
            for split_name, split in (("selection", selection), ("test", test)):
                result, images = reduce(split, thresholds, normal_mean, good_peak, name, only_flagged)
                if (name, only_flagged) == ("global", False):
                    base[split_name] = images
                row[f"{split_name}_seg_f1"] = result["seg_f1"]
                row[f"{split_name}_interval"] = bootstrap.intervals(images)["seg_f1"]
                row[f"{split_name}_vs_global"] = bootstrap.paired_intervals(images, base[split_name])["seg_f1"]
                row[f"{split_name}_oracle"] = result["seg_f1_max_oracle"]
                row[f"{split_name}_disagree"] = [result["outlined_but_passed"], result["flagged_without_outline"]]
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def ci(v: list[float]) -> str:
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]"

    head = ("| category | cut | no outline on pass | SegF1 val+syn [95 %] | − global, paired | SegF1 test [95 %] "
            "| − global, paired | test oracle | test: outlined but passed / flagged without outline |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['category']} | {r['cut']} | {'yes' if r['only_flagged'] else 'no'} "
        f"| {r['selection_seg_f1']:.3f} [{r['selection_interval'][0]:.3f}, {r['selection_interval'][1]:.3f}] "
        f"| {ci(r['selection_vs_global'])} "
        f"| {r['test_seg_f1']:.3f} [{r['test_interval'][0]:.3f}, {r['test_interval'][1]:.3f}] "
        f"| {ci(r['test_vs_global'])} | {r['test_oracle']:.3f} "
        f"| {' / '.join(map(str, r.get('test_disagree', ['?', '?'])))} |\n" for r in rows)


def verdict(rows: list[dict], categories: list[str]) -> str:
    """The fixed rule: a candidate wins only if its paired selection interval is above 0 on every category;
    of several winners, the highest mean selection SegF1 is the default."""
    lines, winners = [], {}
    for key in sorted({(r["cut"], r["only_flagged"]) for r in rows} - {("global", False)}):
        mine = [r for r in rows if (r["cut"], r["only_flagged"]) == key]
        wins = [r["category"] for r in mine if r["selection_vs_global"][0] > 0]
        name = f"{key[0]}{' + no outline on pass' if key[1] else ''}"
        lines.append(f"- {name}: beyond the interval on {len(wins)} of {len(categories)} ({', '.join(wins) or 'none'})")
        if len(wins) == len(categories):
            winners[name] = float(np.mean([r["selection_seg_f1"] for r in mine]))
    chosen = max(winners, key=winners.get) if winners else "global (no candidate wins on every category)"
    return "\n".join(lines) + f"\n\nChosen by the rule: **{chosen}**\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--previous", type=Path, help="rows (.json) of categories measured in an earlier run")
    args = parser.parse_args()
    cached = [c for c in args.categories.split(",") if (args.cache / c / "fit.json").is_file()]
    earlier = [r for r in json.loads(args.previous.read_text()) if r["category"] not in cached] if args.previous else []
    rows = earlier + [row for c in cached for row in measure(args.cache / c)]
    categories = list(dict.fromkeys(r["category"] for r in rows))
    text = table(rows) + "\n" + verdict(rows, categories)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
