"""`anomalyvfm update`: a new model version from images an operator confirmed, without refitting.

Good images (false alarms labelled good, or a folder of good parts) are added to the scoring head
(`head.update.grow`: kNN bank rows, Mahalanobis moments, global embeddings) — the backbone runs on those
images only, never on the training set, through whichever backend the model runs (an exported form needs
no torch). Then the thresholds:

* each added image is scored against the grown head *without itself* (out of fold, as the fit scores its
  training images) and its score and map maximum join the model's normal samples (`added`); a model whose
  thresholds are false-alarm budgets re-estimates them from those samples (`head.budget`), any other keeps
  its thresholds — its validation scores were taken with the smaller bank, and a bank that grows can only
  lower a normal image's kNN score, so they bound the new ones from above;
* images labelled defect are the evidence the other way. With them the image threshold becomes the one that
  misjudges the fewest images whose truth is known — every normal sample (validation, out of fold, added)
  and every labelled defect scored by the grown head — the nearest to the threshold in force among equals
  (`threshold_from_labels`, recorded in its evidence). Keeping *every* flagged defect flagged whatever it
  costs was measured first and rejected: under a camera drift (magnetic_tile, blur 1.5 px) it lowered the
  threshold so far that false alarms on later parts rose by 30 % (docs/line.md).

The result is written atomically as a new model directory with its lineage in the fit record (parent
version, images added, labels used, rows added, thresholds before and after); the parent is untouched
unless `out` is the parent's own folder, which is then replaced in one rename.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from anomalyvfm.detector import model_dir
from anomalyvfm.detector.settings import IMAGE_FALSE_ALARM_RATE
from anomalyvfm.errors import UserInputError
from anomalyvfm.head.budget import BUDGET_SOURCES, add_good_images, with_added
from anomalyvfm.head.calibration import Thresholds
from anomalyvfm.head.head import ScoringHead
from anomalyvfm.head.update import grow
from anomalyvfm.prediction import ImageViews, Predictor



@dataclass
class Labelled:
    """An image to learn from: its path, what it is, and where the label came from (for the lineage)."""

    path: Path
    label: str  # "good" | "defect"
    inspection: str | None = None  # the store record's id


@dataclass
class UpdateReport:
    directory: Path
    lineage: dict[str, Any]
    thresholds: Thresholds
    defects_still_passed: list[str] = field(default_factory=list)


def _views(predictor: Predictor, items: Sequence[Labelled], what: str) -> Iterator[ImageViews]:
    """Each image's features, streamed; an unreadable one ends the update in one line (nothing written)."""
    for views in predictor.view_features([item.path for item in items], f"update ({what})"):
        if views.error:
            raise UserInputError(f"{what} image unreadable: {views.error}")
        yield views


def fewest_errors(normal: np.ndarray, defects: np.ndarray, prefer: float) -> float:
    """The image threshold that misjudges the fewest of these images (a normal one above it, a defect at or
    below it); of equally good ones, the one closest to `prefer` (the threshold in force)."""
    values = np.unique(np.concatenate([normal, defects]))
    cuts = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    errors = (len(normal) - np.searchsorted(np.sort(normal), cuts, side="right")
              + np.searchsorted(np.sort(defects), cuts, side="right"))
    best = cuts[errors == errors.min()]
    return float(best[np.argmin(np.abs(best - prefer))])


def threshold_from_labels(thresholds: Thresholds, defects: list[tuple[Labelled, float]]) -> tuple[Thresholds, list[str]]:
    """With labelled defects, the image threshold that misjudges the fewest images the model knows the truth of:
    every normal sample (validation, out of fold, added) and every labelled defect (scored by the grown head);
    name the labelled defects that pass under it."""
    normal = np.asarray([v for record in thresholds.normal_samples.values() for v in record["image"]], np.float64)
    if not defects or not normal.size:  # (models from before normal samples were stored keep their threshold)
        return thresholds, [str(item.path) for item, score in defects if score <= thresholds.image_threshold]
    scores = np.asarray([score for _, score in defects], np.float64)
    cut = fewest_errors(normal, scores, thresholds.image_threshold)
    passed = [str(item.path) for item, score in defects if score <= cut]
    text = (f"{cut:.6g} = fewest misjudged of {len(normal)} normal samples and {len(defects)} labelled defects "
            f"(was {thresholds.image_threshold:.6g}): {int((normal > cut).sum())} normal above, "
            f"{len(passed)} defects at or below")
    evidence = {**thresholds.evidence, "labels": {"rule": "fewest_errors", "normal": len(normal),
                                                  "defects": len(defects), "text": text}}
    return replace(thresholds, image_threshold=cut, evidence=evidence), passed


def update_model(predictor: Predictor, stored: model_dir.StoredModel, out: str | Path, good: Sequence[Labelled],
                 defects: Sequence[Labelled] = (), source: str = "", rate: float | None = None) -> UpdateReport:
    """Write `out`: `stored` (read by `predictor`) with `good` added and `defects` kept flagged (module doc)."""
    if predictor.score_mode != "distance":
        raise UserInputError(f"{stored.directory}: update learns distance scores; this model judges with "
                             f"'{predictor.score_mode}' scores (use --score distance)")
    if not good:
        raise UserInputError("nothing to add: no good images (label false alarms good, or give --good DIR)")
    model_dir.check_writable(out)
    settings, calibration = stored.settings, stored.calibration
    config = settings.head_config()
    added = list(_views(predictor, good, "good"))  # held together: the bank merge needs every new patch
    before = stored.record.train_images + sum(u["good_images"] for u in stored.record.updates)
    growth = grow(config, stored.head, [views.views for views in added], settings.coreset_ratio, before)
    head = ScoringHead(config, growth.arrays)
    old = calibration.thresholds("distance")
    scores, maxima = [], []
    for views, held_out in zip(added, growth.held_out):
        scored = head.score_views(views.views, views.source, views.processed_shape, views.image_shape,
                                  held_out=held_out)
        pred = head.judge(scored, calibration)
        scores.append(pred.score)
        maxima.append(float(pred.anomaly_map.max()))
    if any(old.normal_samples.get(s) for s in BUDGET_SOURCES):  # budget thresholds: re-estimated with them
        new = add_good_images(old, scores, maxima, rate or settings.false_alarm_rate or IMAGE_FALSE_ALARM_RATE)
    else:
        new = replace(old, normal_samples=with_added(old, scores, maxima))
    judged = [(item, head.predict(views.views, views.source, views.processed_shape, views.image_shape,
                                  calibration).score)  # streamed: one defect's features in memory at a time
              for item, views in zip(defects, _views(predictor, defects, "defect") if defects else [])]
    new, still_passed = threshold_from_labels(new, judged)
    lineage = {
        "parent_version": stored.version, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source, "good_images": len(good), "defect_images": len(defects),
        "inspections": [item.inspection for item in [*good, *defects] if item.inspection],
        "rows_added": growth.rows_added,
        "image_threshold": [old.image_threshold, new.image_threshold],
        "pixel_threshold": [old.pixel_threshold, new.pixel_threshold],
        "added_scores": scores, "defects_still_passed": len(still_passed),
    }
    record = replace(stored.record, updates=[*stored.record.updates, lineage])
    grown = replace(stored, head=growth.arrays, record=record,
                    calibration=replace(calibration, modes={**calibration.modes, "distance": new}))
    directory = model_dir.write(out, grown, copy_from=stored.directory)
    return UpdateReport(directory, lineage, new, still_passed)
