"""Threshold rules compared on real categories, as post-processing of maps computed once per category.

Stage 1 (`cache`, slow, once): fit a detector with default settings on each category's train split,
then store the anomaly maps and image scores of validation/good, of synthetic anomalies made on the
validation images (`anomalyvfm.data.synthesis`) and of test_public in `--cache` (float16 maps).
Stage 2 (`table`, seconds): every threshold rule of `anomalyvfm.maps.thresholds` is fitted on the
cached validation maps, exactly as `fit` would (plus per-image adaptive binarisation, MEBin-style,
above a few of them: `anomalyvfm.maps.binarize`); the rule's parameter that `--choose` selects is the one
with the best SegF1 (pixel rules) or ClassF1 (image rules) on validation + synthetic anomalies, averaged
over categories. test_public is only reported (SegF1, ClassF1, their oracles, false-alarm rate on good
test images), never used to choose.

    nice -n 19 python benchmarks/threshold_rules.py --data ../shared/data --backbone ../dinov2-vits14 \
        --cache /tmp/threshold_cache [--categories bottle,kolektor]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from anomalyvfm.data import load_dataset, load_mask, load_rgb
from anomalyvfm.data.datasets import evenly_spaced
from anomalyvfm.data.synthesis import synthetic_set
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm import metrics as M
from anomalyvfm.maps.binarize import adaptive_mask
from anomalyvfm.maps.thresholds import NormalScores, ThresholdRule, make_rule

CATEGORIES = ("bottle", "ball_screw_drive", "kolektor", "magnetic_tile")
MAX_TRAIN = {"magnetic_tile": 140}  # bounds the time of the largest category, as the brief asks
SYNTHETIC_IMAGES = 24  # synthetic anomalies per category (a multiple of the three synthesis stages)


def _save_split(path: Path, scores: list[float], maps: list[np.ndarray], masks: list[np.ndarray],
                dtype: type = np.float32) -> None:
    """Write one split atomically (temp + rename): scores, labels, maps and bool masks.

    Validation maps stay float32 so that rules see what `fit` sees; test maps are float16 as in `evaluate`.
    """
    arrays = {"scores": np.array(scores), "labels": np.array([int(m.any()) for m in masks])}
    arrays.update({f"map_{k}": m.astype(dtype) for k, m in enumerate(maps)})
    arrays.update({f"mask_{k}": m for k, m in enumerate(masks)})
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as handle:
        np.savez(handle, **arrays)
    os.replace(handle.name, path)


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(scores, labels, maps, masks) of a cached split."""
    with np.load(path) as data:
        n = len(data["scores"])
        return (data["scores"], data["labels"], [data[f"map_{k}"] for k in range(n)],
                [data[f"mask_{k}"] for k in range(n)])


def _predict(detector: AnomalyDetector, images: list, masks: list[np.ndarray | None]) -> tuple[list, list, list]:
    scores, maps, truths = [], [], []
    for pred, mask, image in zip(detector.predict_iter(images, None, decide=False), masks, images):
        if pred.error:
            raise RuntimeError(pred.error)
        scores.append(pred.score)
        maps.append(pred.anomaly_map)
        if isinstance(mask, np.ndarray):
            truths.append(mask)
        elif mask is None:
            truths.append(np.zeros(pred.anomaly_map.shape, bool))
        else:
            truths.append(load_mask(mask, pred.anomaly_map.shape))
    return scores, maps, truths


def fit_images(dataset, category: str) -> tuple[list, list]:
    """The training images (evenly spaced, at most `MAX_TRAIN`) and validation images a category is fitted on."""
    train = [s.path for s in dataset.split("train")]
    if category in MAX_TRAIN:
        train = evenly_spaced(train, MAX_TRAIN[category])
    return train, [s.path for s in dataset.split("validation")]


def cache_category(data: Path, category: str, backbone: str, out: Path) -> dict:
    """Fit with default settings and store validation, synthetic and test_public maps of one category."""
    out.mkdir(parents=True, exist_ok=True)
    done = out / "fit.json"
    if done.exists():
        return json.loads(done.read_text())
    dataset = load_dataset(data, category)
    train, validation = fit_images(dataset, category)
    start = time.perf_counter()
    detector = AnomalyDetector(backbone=backbone).fit(train, validation, progress=False)
    fit_seconds = time.perf_counter() - start
    _save_split(out / "validation.npz", *_predict(detector, validation, [None] * len(validation)))
    good = [load_rgb(p) for p in validation]
    synthetic = synthetic_set(good, per_stage=SYNTHETIC_IMAGES // 3, seed=0)
    _save_split(out / "synthetic.npz", *_predict(detector, [i for i, _, _ in synthetic], [m for _, m, _ in synthetic]))
    test = [s for s in dataset.split("test_public")]
    start = time.perf_counter()
    _save_split(out / "test_public.npz", *_predict(detector, [s.path for s in test],
                                                     [s.mask_path if s.label else None for s in test]), np.float16)
    t = detector.thresholds()
    record = {"category": category, "train_images": len(train), "validation_images": len(validation),
              "fit_seconds": round(fit_seconds, 1), "test_seconds": round(time.perf_counter() - start, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "settings": detector.summary(), "image_threshold": t.image_threshold,
              "pixel_threshold": t.pixel_threshold}
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


# (rule, parameter) pairs compared at each level; the first of each list is today's default.
PIXEL_RULES = [("sigma", 3.0), ("sigma", 4.0), ("sigma", 5.0), ("sigma", 6.0), ("sigma", 8.0),
               ("quantile", 1e-2), ("quantile", 1e-3), ("quantile", 1e-4), ("max", 0.0),
               ("gpd", 1e-4), ("gpd", 1e-5), ("gpd", 1e-6)]
IMAGE_RULES = [("sigma", 3.0), ("sigma", 2.0), ("sigma", 4.0), ("quantile", 0.1), ("quantile", 0.05),
               ("max", 0.0), ("max", 0.5), ("gpd", 0.01), ("gpd", 0.001)]


MEBIN_FLOORS = [("sigma", 3.0), ("quantile", 1e-3), ("gpd", 1e-5)]  # per-image binarisation above these


def _rule(name: str, parameter: float) -> ThresholdRule:
    return make_rule(name, num_sigma=parameter, rate=parameter, margin=parameter)


def _pixel_f1(pixels: NormalScores, masks: list[np.ndarray], maps: list[np.ndarray]) -> dict[tuple, float]:
    """SegF1 of every global pixel rule, and of per-image adaptive binarisation above some of them."""
    maps = [m.astype(np.float16) for m in maps]  # as `evaluate` keeps them: one histogram, no sort
    thresholds = [_rule(name, parameter).decide(pixels, "").threshold for name, parameter in PIXEL_RULES]
    out = {("pixel", name, parameter): f1 for (name, parameter), f1 in
           zip(PIXEL_RULES, M.seg_f1_at(masks, maps, thresholds))}
    for name, parameter in MEBIN_FLOORS:
        floor = _rule(name, parameter).decide(pixels, "").threshold
        tp = fp = fn = 0
        for truth, amap in zip(masks, maps):
            predicted = adaptive_mask(amap, floor)
            hit = int(np.count_nonzero(truth & predicted))
            tp, fp, fn = tp + hit, fp + int(predicted.sum()) - hit, fn + int(truth.sum()) - hit
        out[("pixel", f"mebin>{name}", parameter)] = 2 * tp / max(2 * tp + fp + fn, 1)
    return out


def _normal(values: list[np.ndarray]) -> NormalScores:
    sample = NormalScores()
    for v in values:
        sample.update(v)
    return sample


def _selection_scores(category_dir: Path) -> dict[tuple, float]:
    """SegF1 / ClassF1 of every rule on validation + synthetic anomalies, two folds: each rule is fitted on
    half of the validation images and judged on the other half plus the synthetic anomalies, so that a
    rule is not rewarded for never rejecting the very images it was fitted on."""
    v_scores, _, v_maps, v_masks = load_split(category_dir / "validation.npz")
    s_scores, _, s_maps, s_masks = load_split(category_dir / "synthetic.npz")
    folds = [np.arange(len(v_maps)) % 2 == f for f in (0, 1)]
    results: dict[tuple, list[float]] = {}
    for fit in folds:
        held = np.flatnonzero(~fit)
        pixels = _normal([v_maps[i] for i in np.flatnonzero(fit)])
        images = _normal([np.array([v_scores[i]]) for i in np.flatnonzero(fit)])
        masks = [v_masks[i] for i in held] + s_masks
        maps = [v_maps[i] for i in held] + s_maps
        labels = np.r_[np.zeros(len(held), int), np.ones(len(s_scores), int)]
        scores = np.r_[v_scores[held], s_scores]
        for key, value in _pixel_f1(pixels, masks, maps).items():
            results.setdefault(key, []).append(value)
        for name, parameter in IMAGE_RULES:
            t = _rule(name, parameter).decide(images, "images").threshold
            results.setdefault(("image", name, parameter), []).append(M.class_f1(labels, scores, t))
    return {key: float(np.mean(values)) for key, values in results.items()}


def _test_scores(category_dir: Path) -> dict:
    """Every rule fitted on all validation images, reported on test_public (never used to choose)."""
    v_scores, _, v_maps, _ = load_split(category_dir / "validation.npz")
    t_scores, t_labels, t_maps, t_masks = load_split(category_dir / "test_public.npz")
    pixels, images = _normal(v_maps), _normal([np.array([s]) for s in v_scores])
    out: dict = {"seg_f1_max_oracle": M.seg_f1_max(t_masks, t_maps)[0],
                 "f1_max_oracle": M.f1_max(t_labels, t_scores)[0],
                 "image_auroc": M.image_auroc(t_labels, t_scores)}
    good = t_scores[t_labels == 0]
    for key, value in _pixel_f1(pixels, t_masks, t_maps).items():
        out[key] = {"test": value}
    for name, parameter in PIXEL_RULES:
        out[("pixel", name, parameter)]["threshold"] = _rule(name, parameter).decide(pixels, "").threshold
    for name, parameter in IMAGE_RULES:
        t = _rule(name, parameter).decide(images, "images").threshold
        out[("image", name, parameter)] = {"threshold": t, "test": M.class_f1(t_labels, t_scores, t),
                                           "false_alarms": f"{int((good > t).sum())}/{len(good)}"}
    return out


def table(cache: Path, categories: list[str]) -> str:
    """The markdown comparison: selection score (validation + synthetic) and test_public figures per rule."""
    selection = {c: _selection_scores(cache / c) for c in categories}
    test = {c: _test_scores(cache / c) for c in categories}
    fits = {c: json.loads((cache / c / "fit.json").read_text()) for c in categories}
    same = all(test[c][("pixel", "sigma", 3.0)]["threshold"] == fits[c]["pixel_threshold"]
               and test[c][("image", "sigma", 3.0)]["threshold"] == fits[c]["image_threshold"] for c in categories)
    lines = [f"Cached validation maps reproduce fit's sigma-3 thresholds bit for bit: {'yes' if same else 'NO'}",
             "", "| category | train | validation | fit s | test s | peak RSS MB | image AUROC (test) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c} | {f['train_images']} | {f['validation_images']} | {f['fit_seconds']} | {f['test_seconds']} | "
              f"{f['peak_rss_mb']} | {test[c]['image_auroc']:.3f} |" for c, f in fits.items()]
    for level, rules, metric, oracle in (("pixel", PIXEL_RULES, "SegF1", "seg_f1_max_oracle"),
                                         ("image", IMAGE_RULES, "ClassF1", "f1_max_oracle")):
        keys = [(level, name, parameter) for name, parameter in rules]
        if level == "pixel":
            keys += [(level, f"mebin>{name}", parameter) for name, parameter in MEBIN_FLOORS]
        means = {key: float(np.mean([selection[c][key] for c in categories])) for key in keys}
        chosen = max(keys, key=lambda key: means[key])  # max keeps the first (cheapest listed) of ties
        head = [f"{level} rule", f"mean {metric} val+syn"] + [f"{c} val+syn / test" for c in categories]
        head += [f"mean test {metric}"] + (["test false alarms (good images)"] if level == "image" else [])
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in keys:
            _, name, parameter = key
            label = f"{name} {parameter:g}" + (" (default)" if key == keys[0] else "") + (" **chosen**" if key == chosen else "")
            cells = [label, f"{means[key]:.3f}"]
            cells += [f"{selection[c][key]:.3f} / {test[c][key]['test']:.3f}" for c in categories]
            cells.append(f"{np.mean([test[c][key]['test'] for c in categories]):.3f}")
            if level == "image":
                cells.append(" ".join(test[c][key]["false_alarms"] for c in categories))
            lines.append("| " + " | ".join(cells) + " |")
        cells = [f"oracle on test ({oracle})", "–"] + [f"– / {test[c][oracle]:.3f}" for c in categories]
        cells.append(f"{np.mean([test[c][oracle] for c in categories]):.3f}")
        lines.append("| " + " | ".join(cells + ([""] if level == "image" else [])) + " |")
    return "\n".join(lines) + "\n"


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The options of every real-data threshold study (this one and `oof_thresholds.py`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    return parser


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--cache-only", action="store_true", help="stage 1 only")
    args = parser.parse_args()
    categories = args.categories.split(",")
    for category in categories:
        print(json.dumps(cache_category(args.data, category, args.backbone, args.cache / category)), flush=True)
    if not args.cache_only:
        print(table(args.cache, categories))


if __name__ == "__main__":
    main()
