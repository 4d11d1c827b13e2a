"""Evaluation to the MVTec AD 2 protocol: run a fitted detector on a labelled split, compute the
metrics, write `metrics.json` and the report pictures; export maps in the benchmark server's layout.

Memory policy: maps are kept as float16 (2 bytes a pixel) and masks as bool, so one MVTec AD 2
category (~750 M pixels) needs about 2.3 GB for the arrays; `anomalyvfm.metrics` works on them
without full-size float64 copies.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from anomalyvfm import metrics as M
from anomalyvfm.evaluation import html_report, report
from anomalyvfm.metrics import bootstrap
from anomalyvfm.data import Dataset, Sample, load_mask, load_rgb
from anomalyvfm.data.resample import block_means
from anomalyvfm.prediction import Predictor
from anomalyvfm.errors import UserInputError
from anomalyvfm.maps.binarize import model_mask
from anomalyvfm.maps.render import display_range
from anomalyvfm.outputs import write_text

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro_0.05", "aupro_0.3", "seg_f1", "class_f1", "f1_max_oracle",
               "seg_f1_max_oracle", "num_images", "num_anomalous", "outlined_but_passed", "flagged_without_outline",
               "seconds", "peak_rss_mb", "intervals", "bootstrap")
PER_IMAGE_NAME = "per_image.npz"  # each image's reduction (`metrics.PerImage`), for paired comparisons of runs
PCA_IMAGES = 8  # images per side sampled for feature_analysis.png: enough for a picture, cheap to compute
PCA_PATCHES = 3000


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    Linux's `VmHWM` is the peak of this process's own memory (reset by `reset_peak_rss`); `ru_maxrss`
    is the fallback elsewhere, but on Linux it also carries the parent's peak across fork + exec and never
    resets, so a benchmark worker would report its launcher's size.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Restart the peak-memory count (Linux `clear_refs` resets `VmHWM`), so that each benchmark variant
    reports its own peak rather than the largest so far; elsewhere the count simply keeps running."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _labelled(samples: list[Sample], split: str) -> list[Sample]:
    if not samples or any(s.label is None for s in samples):
        raise UserInputError(f"split '{split}' has no labels: evaluate needs a labelled split such as test_public")
    return samples


def evaluate(detector: Predictor, dataset: Dataset, split: str, out: str | Path, progress: bool = True) -> dict:
    """Score every image of `split`, compute all metrics and write `metrics.json` plus the report files."""
    samples = _labelled(dataset.split(split), split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kept, scores, maps, masks = [], [], [], []
    for sample, pred in zip(samples, detector.predict_iter([s.path for s in samples], "evaluate" if progress else None)):
        if pred.error:
            print(f"anomalyvfm: skipped {pred.error}", file=sys.stderr)
            continue
        shape = pred.anomaly_map.shape
        kept.append(sample)
        scores.append(pred.score)
        maps.append(pred.anomaly_map.astype(np.float16))
        masks.append(load_mask(sample.mask_path, shape) if sample.label and sample.mask_path else np.zeros(shape, bool))
    labels = np.array([s.label for s in kept])
    t = detector.thresholds()
    settings, flagged = detector.settings, np.array(scores) > t.image_threshold
    counts = None  # SegF1 of the masks the model outputs, when they are not its global threshold's
    if settings.binarize != "global" or settings.outline_only_flagged:
        counts = np.array([M.mask_counts(g, model_mask(m, settings, t, f)) for g, m, f in zip(masks, maps, flagged)])
    result, images = M.evaluate_images(labels, np.array(scores), masks, maps, t.image_threshold, t.pixel_threshold,
                                       counts)
    result["intervals"], result["bootstrap"] = bootstrap.intervals(images), bootstrap.describe()
    images.save(out / PER_IMAGE_NAME)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result = {key: result[key] for key in METRIC_KEYS}
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "performance_summary.txt", report.format_table(result) + report.threshold_lines(t.evidence))
    _write_pictures(detector, kept, labels, np.array(scores), maps, masks, result, dataset, out)
    html_report.write_report(out, detector, dataset, split, kept, labels, np.array(scores), maps, masks, result)
    return result


def _write_pictures(detector, samples, labels, scores, maps, masks, result, dataset: Dataset, out: Path) -> None:
    t = detector.thresholds()
    report.plot_score_histograms(labels, scores, t.image_threshold, out / "anomaly_scores.png")
    fpr, pro = M.pro_curve(masks, maps, fpr_limit=0.3) if labels.any() else (np.zeros(1), np.zeros(1))
    report.plot_roc_pro(labels, scores, fpr, pro, result, out / "roc_curves.png")
    rows = []
    for label, name in ((1, "bad"), (0, "good")):
        idx = np.flatnonzero(labels == label)
        if len(idx) == 0:
            continue
        for pick, which in ((idx[np.argmax(scores[idx])], "highest"), (idx[np.argmin(scores[idx])], "lowest")):
            rows.append({"title": f"{which} {name}: {scores[pick]:.3g}", "image": load_rgb(samples[pick].path),
                         "gt": masks[pick], "map": maps[pick].astype(np.float32), "mask": model_mask(maps[pick], detector.settings, t, bool(scores[pick] > t.image_threshold))})
    vmin, vmax = display_range(t.validation_stats["pixel_score_mean"], t.pixel_threshold)
    report.plot_sample_detections(rows, vmin, vmax, out / "sample_detections.png")
    # the defective images with the largest defects: small ones hold too few patches to show a cloud
    bad = sorted(((s, m) for s, m in zip(samples, masks) if m.any()), key=lambda sm: -int(sm[1].sum()))[:PCA_IMAGES]
    normal = _patch_sample(detector, [s.path for s in dataset.split("train")[:PCA_IMAGES]], None)
    defect = _patch_sample(detector, [s.path for s, _ in bad], [m for _, m in bad])
    if len(normal) > 1:  # every training image unreadable: no cloud to draw
        report.plot_feature_pca(normal, defect, out / "feature_analysis.png")


def _patch_sample(detector: Predictor, paths: list, masks: list | None, seed: int = 0) -> np.ndarray:
    """Patch features of `paths` (only patches at least half inside `masks`, when given), subsampled."""
    picked = []
    for i, item in enumerate(detector.features(paths)):
        if getattr(item, "error", None) is not None:  # a FailedImage (or an exported runtime's failure)
            continue
        h, w, dim = item.features.shape
        features = np.asarray(item.features).reshape(h * w, dim)
        if masks is not None:
            features = features[block_means(masks[i], (h, w)).reshape(-1) >= 0.5]
        picked.append(features)
    if not picked:
        return np.zeros((0, 0), np.float32)
    allf = np.concatenate(picked)
    rng = np.random.default_rng(seed)
    return allf[rng.choice(len(allf), size=min(PCA_PATCHES, len(allf)), replace=False)]


def export_submission(detector: Predictor, dataset: Dataset, out: str | Path, progress: bool = True) -> dict[str, int]:
    """Write MVTec AD 2 server files for `test_private` and `test_private_mixed` (those present).

    `anomaly_images/<cat>/<split>/<stem>.tiff` holds the float16 map at full image size and
    `anomaly_images_thresholded/<cat>/<split>/<stem>.png` the 0/255 mask at the validation threshold.
    Returns the number of images written per split; unreadable images are reported and skipped.
    """
    out = Path(out)
    category = dataset.category or "category"
    written: dict[str, int] = {}
    for split in ("test_private", "test_private_mixed"):
        if split not in dataset.splits:
            continue
        maps_dir = out / "anomaly_images" / category / split
        masks_dir = out / "anomaly_images_thresholded" / category / split
        maps_dir.mkdir(parents=True, exist_ok=True)
        masks_dir.mkdir(parents=True, exist_ok=True)
        samples = dataset.split(split)
        written[split] = 0
        for sample, pred in zip(samples, detector.predict_iter([s.path for s in samples], split if progress else None)):
            if pred.error:
                print(f"anomalyvfm: skipped {pred.error}", file=sys.stderr)
                continue
            tifffile.imwrite(maps_dir / f"{sample.path.stem}.tiff", pred.anomaly_map.astype(np.float16))
            Image.fromarray(pred.mask.astype(np.uint8) * 255).save(masks_dir / f"{sample.path.stem}.png")
            written[split] += 1
    if not written:
        raise UserInputError(f"{dataset.root}: no test_private or test_private_mixed split to export")
    return written
