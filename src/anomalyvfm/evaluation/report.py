"""Report pictures and tables for an evaluation: what a person looks at to judge a model.

Every function takes plain arrays and writes one file, so the evaluation code decides *what* to show
and this module only *how*. Matplotlib runs headless (Agg).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from anomalyvfm.maps.render import heatmap  # noqa: E402

METRIC_LABELS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro_0.05": "AU-PRO (FPR ≤ 0.05)",
    "aupro_0.3": "AU-PRO (FPR ≤ 0.3)",
    "seg_f1": "SegF1 (validation threshold)",
    "class_f1": "ClassF1 (validation threshold)",
    "f1_max_oracle": "Image F1-max (oracle, test labels)",
    "seg_f1_max_oracle": "SegF1-max (oracle, test labels)",
    "num_images": "Images",
    "num_anomalous": "Anomalous images",
    "outlined_but_passed": "Outlined but passed",
    "flagged_without_outline": "Flagged without outline",
    "seconds": "Seconds",
    "peak_rss_mb": "Peak RSS (MB)",
}


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_score_histograms(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> None:
    """Image-score histograms, good vs bad, with the validation image threshold drawn."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.histogram_bin_edges(scores, bins=30)
    for value, name, colour in ((0, "good", "tab:green"), (1, "bad", "tab:red")):
        ax.hist(scores[labels == value], bins=bins, alpha=0.6, color=colour, label=f"{name} ({(labels == value).sum()})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title="Image scores")
    ax.legend()
    _save(fig, path)


def plot_roc_pro(labels: np.ndarray, scores: np.ndarray, pro_fpr: np.ndarray, pro: np.ndarray, metrics: dict, path: Path) -> None:
    """Image ROC curve and the PRO curve up to FPR 0.3, with AUROC / AU-PRO in the legends."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        left.plot(fpr, tpr, label=f"image AUROC = {metrics['image_auroc']:.3f}")
    left.plot([0, 1], [0, 1], color="gray", linestyle=":")
    left.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Image ROC")
    left.legend(loc="lower right")
    keep = pro_fpr <= 0.3
    right.plot(pro_fpr[keep], pro[keep], label=f"AU-PRO(0.3) = {metrics['aupro_0.3']:.3f}")
    right.axvline(0.05, color="gray", linestyle="--", label=f"FPR 0.05: AU-PRO = {metrics['aupro_0.05']:.3f}")
    right.set(xlim=(0, 0.3), ylim=(0, 1), xlabel="pixel false-positive rate", ylabel="per-region overlap", title="PRO curve")
    right.legend(loc="lower right")
    _save(fig, path)


def plot_sample_detections(rows: Sequence[dict], vmin: float, vmax: float, path: Path) -> None:
    """One row per image: image, ground truth, heat-map overlay and predicted mask.

    Each row dict has `title`, `image` (HxWx3 uint8), `gt` (bool HxW or None), `map`, `mask`.
    """
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 2.8 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        image = row["image"]
        gt = row["gt"] if row["gt"] is not None else np.zeros(image.shape[:2], bool)
        blended = (0.55 * image + 0.45 * heatmap(row["map"], vmin, vmax)).astype(np.uint8)
        for ax, picture, name in zip(ax_row, (image, gt, blended, row["mask"]),
                                     (row["title"], "ground truth", "anomaly map", "predicted mask")):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1 if picture.ndim == 2 else None)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    _save(fig, path)


def plot_feature_pca(normal: np.ndarray, defect: np.ndarray, path: Path) -> None:
    """2-D PCA (fitted on normal patches) of normal training patches vs patches inside defects."""
    fig, ax = plt.subplots(figsize=(6, 5))
    pca = PCA(n_components=2, random_state=0).fit(normal)
    a = pca.transform(normal)
    ax.scatter(a[:, 0], a[:, 1], s=3, alpha=0.3, color="tab:blue", label=f"normal train patches ({len(normal)})")
    if len(defect):
        b = pca.transform(defect)
        ax.scatter(b[:, 0], b[:, 1], s=6, alpha=0.6, color="tab:red", label=f"patches inside defects ({len(defect)})")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Patch features (PCA of normal patches)")
    ax.legend(markerscale=3)
    _save(fig, path)


def threshold_lines(evidence: dict[str, dict]) -> str:
    """How each threshold was read off the validation scores (the rule's evidence line), one line a level."""
    return "".join(f"{level} threshold: {e['text']}\n" for level, e in evidence.items() if "text" in e)


def metric_text(metrics: dict, key: str, digits: int = 4) -> str:
    """One figure as text, with its 95 % bootstrap interval when the evaluation computed one: 0.9123 [0.8800, 0.9400]."""
    value = metrics[key]
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    interval = metrics.get("intervals", {}).get(key)
    return text if interval is None else f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def format_table(metrics: dict) -> str:
    """The metrics as an aligned plain-text table (intervals: 95 % bootstrap over images)."""
    width = max(len(label) for label in METRIC_LABELS.values())
    lines = [f"{label:<{width}}  {metric_text(metrics, key)}" for key, label in METRIC_LABELS.items() if key in metrics]
    if metrics.get("intervals"):
        lines.append("[low, high]: 95 % bootstrap interval over the test images")
    return "\n".join(lines) + "\n"
