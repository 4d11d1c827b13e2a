"""`report.html`: one self-contained page that shows how a model did on a labelled split, and why.

A quality engineer deciding whether a model goes to the line opens one file, from disk, in any browser:
no server, no internet, nothing next to it needed. Every picture is embedded as a base64 PNG. The page
puts the verdict counts and metrics first, then the pictures that explain them (score histogram, ROC and
PRO curves, sample detections), then the worst mistakes at the model's threshold with their maps, and
last the settings and data that produced all of it, so the numbers can be reproduced.

The evaluation code decides what was measured; this module only lays it out. The report pictures that
`evaluate` already writes as PNG files are embedded as they are, not drawn a second time.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

from anomalyvfm.version import __version__
from anomalyvfm.data import Dataset, Sample, load_rgb
from anomalyvfm.declare import to_dict
from anomalyvfm.evaluation.report import METRIC_LABELS, metric_text
from anomalyvfm.maps.binarize import HYSTERESIS_FRACTION, model_mask
from anomalyvfm.maps.render import display_range, overlay
from anomalyvfm.outputs import write_atomic, write_text

REPORT_NAME = "report.html"
INDEX_NAME = "index.html"
WORST_CASES = 4  # per kind of mistake: enough to see a pattern, few enough to keep the file small
CASE_SIDE = 360  # longest side (px) of the embedded case pictures; the full-size maps stay in the arrays
FIGURES = (  # files `evaluate` writes, in the order and with the captions the report shows them
    ("anomaly_scores.png", "Image scores", "Score histograms of good and defective images; the dashed line is "
                                           "the model's image threshold."),
    ("roc_curves.png", "ROC and PRO curves", "Left: image-level ROC. Right: per-region overlap against the pixel "
                                             "false-positive rate, up to 0.3."),
    ("sample_detections.png", "Sample detections", "The highest- and lowest-scoring defective and good images: "
                                                   "image, ground truth, heat map, predicted mask."),
    ("feature_analysis.png", "Patch features", "PCA of normal training patches and of patches inside defects."),
)

CUT_NOTES = {  # how the report explains each non-global cut (`maps.binarize`), after the pixel threshold
    "mebin": "; each image's mask is cut at its own most stable threshold at or above it (mebin)",
    "hysteresis": "; a region is outlined when it holds a pixel above it, grown down to a level "
                  f"{HYSTERESIS_FRACTION:g} of the way from the mean to it, and covers at least one patch (hysteresis)",
    "mebin+hysteresis": "; each image's mask is its mebin cut united with its hysteresis regions",
}

STYLE = """
body{font-family:system-ui,"Segoe UI","DejaVu Sans",sans-serif;margin:0 auto;max-width:1200px;padding:1rem 1.5rem;color:#1f1f1f}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.2rem;margin:1.6rem 0 .5rem;border-bottom:1px solid #d0d4d9}
table{border-collapse:collapse;font-size:.92rem}td,th{border-bottom:1px solid #e0e3e7;padding:.2rem .7rem;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#5f6368}figure{margin:.5rem 0}
figure img{max-width:100%;border:1px solid #e0e3e7}figcaption{color:#5f6368;font-size:.9rem}
.cases{width:100%;table-layout:fixed}.cases td img{display:block;width:100%;height:auto}
.cases code{overflow-wrap:anywhere}.fail{color:#b3261e;font-weight:700}.pass{color:#137333;font-weight:700}
code{font-size:.88rem}.top{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1.3fr);gap:2rem}
"""


def write_report(out: Path, detector: Any, dataset: Dataset, split: str, samples: Sequence[Sample],
                 labels: np.ndarray, scores: np.ndarray, maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                 metrics: dict) -> Path:
    """Write `out/report.html` for the evaluation `evaluate` has just done (its pictures already in `out`)."""
    calib = calibration(detector)
    decided = scores > calib["image_threshold"]
    figures = [_figure(out / name, title, caption) for name, title, caption in FIGURES]
    sections = [
        # first screen: the verdicts, the metrics and the score histogram side by side
        '<div class="top"><div>' + _summary(labels, decided, calib["image_threshold"])
        + _section("Metrics", _metrics_table(metrics)) + f"</div><div>{figures[0]}</div></div>",
        *figures[1:],
        _worst_cases(detector, dataset, samples, labels, scores, maps, masks, calib),
        _section("Data and settings", _data_table(dataset, split, samples, labels, metrics, calib)
                 + "<h3>Model settings</h3>" + _table(settings(detector).items())),
    ]
    title = f"Evaluation of {dataset.category or dataset.root.name} on {split}"
    path = Path(out) / REPORT_NAME
    write_atomic(path, lambda tmp: write_text(tmp, _page(title, "".join(sections))))
    return path


def write_index(out: Path, rows: Sequence[dict], reports: dict[tuple[str, str], Path], columns: Sequence[str]) -> Path:
    """Write `out/index.html`: the benchmark table with a link to each category's `report.html`."""
    out = Path(out)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            text = html.escape(_number(value) if isinstance(value, float) else str(value))
            report = reports.get((row.get("variant", ""), row.get("category", "")))
            if column == "category" and report is not None:
                text = f'<a href="{html.escape(os.path.relpath(report, out))}">{text}</a>'
            cells.append(f'<td class="{"n" if isinstance(value, (int, float)) else ""}">{text}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    path = out / INDEX_NAME
    page = _page("Benchmark", _section("Results (one report per category)", table))
    write_atomic(path, lambda tmp: write_text(tmp, page))
    return path


# ---- what of the detector the report shows (one place each, so the facade can change under it) ----------

def calibration(detector: Any) -> dict:
    """Thresholds and the validation statistics they were computed from."""
    t = detector.thresholds()
    return {"image_threshold": float(t.image_threshold), "pixel_threshold": float(t.pixel_threshold),
            "threshold_sigma": detector.settings.threshold_sigma, "validation_stats": dict(t.validation_stats),
            "binarize": detector.settings.binarize, "outline_only_flagged": detector.settings.outline_only_flagged,
            "evidence": dict(t.evidence),
            "train_images": detector.record.train_images}


def settings(detector: Any) -> dict:
    """Every setting of the model (as stored in its directory) and the score mode in use."""
    return {**to_dict(detector.settings), "score": detector.score_mode}


# ---- sections ---------------------------------------------------------------------------------------------

def _summary(labels: np.ndarray, decided: np.ndarray, threshold: float) -> str:
    bad, good = labels == 1, labels == 0
    counts = [("defective images found (true positives)", int((bad & decided).sum()), int(bad.sum())),
              ("defective images missed (false negatives)", int((bad & ~decided).sum()), int(bad.sum())),
              ("good images passed (true negatives)", int((good & ~decided).sum()), int(good.sum())),
              ("good images rejected (false positives)", int((good & decided).sum()), int(good.sum()))]
    rows = "".join(f'<tr><td>{name}</td><td class="n">{n} of {total}</td></tr>' for name, n, total in counts)
    return _section(f"Verdicts at the model's image threshold {threshold:.4g}", f"<table>{rows}</table>")


def _metrics_table(metrics: dict) -> str:
    """The figures, each with its 95 % bootstrap interval over the test images where one was computed."""
    table = _table((label, metric_text(metrics, key) if key in metrics.get("intervals", {}) else metrics[key])
                   for key, label in METRIC_LABELS.items() if key in metrics)
    if not metrics.get("intervals"):
        return table
    how = metrics.get("bootstrap", {})
    return table + (f'<p class="muted">[low, high]: {100 * how.get("level", 0.95):g} % bootstrap interval, '
                    f'{how.get("resamples", "?")} resamples of the test images within each label '
                    f'(seed {how.get("seed", "?")}). Two runs differ beyond noise only if their paired interval '
                    "excludes 0.</p>")


def _figure(path: Path, title: str, caption: str) -> str:
    if not path.is_file():
        return _section(title, f'<p class="muted">{html.escape(path.name)} was not written for this evaluation.</p>')
    return _section(title, f'<figure><img src="{_data_url(path.read_bytes())}" alt="{html.escape(title)}">'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _worst_cases(detector: Any, dataset: Dataset, samples: Sequence[Sample], labels: np.ndarray, scores: np.ndarray,
                 maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], calib: dict) -> str:
    """The good images that scored highest and the defective ones that scored lowest, with their maps."""
    threshold = calib["image_threshold"]
    span = display_range(calib["validation_stats"].get("pixel_score_mean", 0.0), calib["pixel_threshold"])
    parts = []
    for label, kind, order, side, who in ((0, "False positives: good images rejected", -1, "above", "highest"),
                                          (1, "False negatives: defective images passed", 1, "at or below", "lowest")):
        idx = np.flatnonzero(labels == label)
        idx = idx[np.argsort(order * scores[idx], kind="stable")][:WORST_CASES]
        errors = int(((scores[labels == label] > threshold) != bool(label)).sum())
        name = "defective" if label else "good"
        note = (f"{errors} {name} image(s) scored {side} the image threshold {threshold:.4g}. "
                f"The {len(idx)} {who}-scoring {name} images are shown"
                + (", the closest to being mistaken." if errors == 0 else "."))
        rows = [_case_row(detector, dataset, samples[i], scores[i], threshold, maps[i], masks[i], span) for i in idx]
        header = "<tr><th>image</th><th>heat map and predicted outline</th><th>ground truth</th><th>file and score</th></tr>"
        parts.append(f'<h3>{kind}</h3><p class="muted">{html.escape(note)}</p>'
                     f'<table class="cases">{header}{"".join(rows)}</table>')
    return _section("Worst mistakes", "".join(parts))


def _case_row(detector: Any, dataset: Dataset, sample: Sample, score: float, threshold: float, amap: np.ndarray,
              gt: np.ndarray, span: tuple[float, float]) -> str:
    image = load_rgb(sample.path)
    amap = amap.astype(np.float32)
    predicted = model_mask(amap, detector.settings, detector.thresholds(), bool(score > threshold))
    heat = overlay(image, amap, *span, mask=predicted)
    truth = image.copy()
    if gt.any():  # tinted, and ringed thickly enough to survive the shrink to CASE_SIDE: defects can be tiny
        truth[gt] = (0.5 * truth[gt] + 0.5 * np.array([0, 200, 0])).astype(np.uint8)
        ring = max(1, round(1.5 * max(gt.shape) / CASE_SIDE))
        truth[binary_dilation(gt, iterations=2 * ring) & ~binary_dilation(gt, iterations=ring)] = (0, 230, 0)
    verdict = '<span class="fail">FAIL</span>' if score > threshold else '<span class="pass">PASS</span>'
    pictures = "".join(f'<td><img src="{_data_url(_png(p))}" alt="{alt} of {html.escape(sample.path.name)}"></td>'
                       for p, alt in ((image, "image"), (heat, "heat map"), (truth, "ground truth")))
    return (f"<tr>{pictures}<td><code>{html.escape(_relative(sample.path, dataset.root))}</code><br>"
            f"score {score:.4g} vs {threshold:.4g}: {verdict}<br>"
            f"defect area {int(gt.sum())} px, predicted {int(predicted.sum())} px</td></tr>")


def _threshold_text(calib: dict, level: str) -> str | None:
    """The rule's own account of a threshold (models fitted before rules were stored have none)."""
    return calib.get("evidence", {}).get(level, {}).get("text")


def _data_table(dataset: Dataset, split: str, samples: Sequence[Sample], labels: np.ndarray, metrics: dict,
                calib: dict) -> str:
    stats = calib["validation_stats"]
    listed = len(dataset.split(split))
    rows = [
        ("dataset", f"{dataset.root} (layout {dataset.layout})"),
        ("category", dataset.category or "–"),
        ("split evaluated", split),
        ("images", f"{len(samples)} scored of {listed} listed ({listed - len(samples)} unreadable, skipped), "
                   f"{int(labels.sum())} defective, {int((labels == 0).sum())} good"),
        ("train images", calib["train_images"]),
        ("image threshold", _threshold_text(calib, "image") or
         f"{calib['image_threshold']:.6g} = mean {stats.get('image_score_mean', float('nan')):.6g} "
         f"+ {calib['threshold_sigma']} × std {stats.get('image_score_std', float('nan')):.6g} "
         f"of the image scores of {stats.get('images', '?')} defect-free validation images"),
        ("pixel threshold", _threshold_text(calib, "pixel") or
         f"{calib['pixel_threshold']:.6g} = mean {stats.get('pixel_score_mean', float('nan')):.6g} "
         f"+ {calib['threshold_sigma']} × std {stats.get('pixel_score_std', float('nan')):.6g} "
         "of their map pixels"
         + CUT_NOTES.get(calib["binarize"], "")
         + ("; images judged good get no outline" if calib["outline_only_flagged"] else "")),
        ("test labels used for thresholds", "no: both thresholds come from validation images only"),
        ("run time", f"{metrics.get('seconds', '?')} s, peak RSS {metrics.get('peak_rss_mb', '?')} MB"),
        ("written", f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by anomalyvfm {__version__}"),
    ]
    return _table(rows)


# ---- HTML and files -----------------------------------------------------------------------------------------

def _table(rows: Iterable[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"<td>{_number(value)}</td>"
        if isinstance(value, (dict, list, tuple)):
            return f"<td><code>{html.escape(json.dumps(value, default=str))}</code></td>"
        return f"<td>{html.escape(str(value))}</td>"
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th>{cell(v)}</tr>" for k, v in rows) + "</table>"


def _number(value: int | float) -> str:
    """Scores and rates in [0, 1] to four places; seconds, megabytes and counts as they read best."""
    if not isinstance(value, float):
        return str(value)
    if abs(value) > 1:
        return f"{value:,.1f}"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.4g}"


def _section(title: str, body: str) -> str:
    anchor = "-".join("".join(ch if ch.isalnum() else " " for ch in title.lower()).split())
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{html.escape(title)}</h1>{body}</body></html>\n')


def _png(image: np.ndarray) -> bytes:
    picture = Image.fromarray(image)
    picture.thumbnail((CASE_SIDE, CASE_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
