"""Choosing the mask cut from labelled defects (`fit --defects`): MEBin, or MEBin grown to a good part's level.

MEBin (the default cut, `maps.binarize`) outlines compact defects well and cuts a broad faint *dome* at its core;
`mebin-grown` outlines the dome down to the level a typical good part reaches. Which a product needs depends on
what its defects look like, and normal data cannot show that (on the synthetic anomalies MEBin wins on every
category, docs/results.md). Outlined labelled defects can: the normal model outlines them and the validation images
under both cuts, and `mebin-grown` replaces MEBin only if its pooled SegF1 is higher beyond the 95 % paired
bootstrap interval over those images (resampled within each label) — with a few defects the interval is wide and
the default stays. Fewer than `MIN_CUT_DEFECTS` outlined defects, or a cut the user set to anything but MEBin,
leave the cut as it is.

The defects are outlined by the normal model (its own thresholds), not by the model that has learnt them: that
one raises exactly these images' patches (it learnt them), so their outlines would not show how unseen defects are
cut. The cut sets no threshold; `--calibration-defects` then sets thresholds through whichever cut is chosen.
Judged once on fresh draws by a criterion fixed before the run (docs/adaptation.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from anomalyvfm import metrics as M
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.head.defects import ScoredImage
from anomalyvfm.head.head import ScoringHead
from anomalyvfm.maps.binarize import model_mask
from anomalyvfm.metrics.bootstrap import resample_indices, resampled_seg_f1

DEFAULT_CUT, GROWN_CUT = "mebin", "mebin-grown"
MIN_CUT_DEFECTS = 3  # outlined labelled defects before the cut can change (an interval over fewer means nothing)
CUT_RESAMPLES = 500  # bootstrap resamples of the paired interval


def choose_cut(head: ScoringHead, calibration: Calibration, defects: Sequence[ScoredImage],
               validation: Sequence[ScoredImage]) -> dict[str, Any]:
    """The cut for a model that learns `defects` (as the normal `head` scored them) and its record (module
    docstring): `chosen`, the pooled SegF1 of each cut, the interval of their difference, the rule and why."""
    outlined = [d for d in defects if d.mask is not None]
    rule = (f"{GROWN_CUT} replaces {DEFAULT_CUT} if its pooled SegF1 on the outlined defects and the validation images "
            f"is higher beyond the 95 % paired bootstrap interval; needs {MIN_CUT_DEFECTS} outlined defects")
    current = head.config.binarize
    if current != DEFAULT_CUT or len(outlined) < MIN_CUT_DEFECTS:
        why = ("set by the user" if current != DEFAULT_CUT
               else f"{len(outlined)} outlined defects, fewer than {MIN_CUT_DEFECTS}")
        return {"chosen": current, "rule": rule, "why": f"{current}: {why}"}
    thresholds = calibration.thresholds()
    images = [*validation, *outlined]
    preds = [head.judge(image.scored, calibration, calibration.mode, thresholds) for image in images]
    truths = [np.zeros(p.anomaly_map.shape, bool) if image.mask is None else image.mask for image, p in zip(images, preds)]
    counts = {cut: np.array([M.mask_counts(truth, model_mask(p.anomaly_map, replace(head.config, binarize=cut),
                                                             thresholds, p.is_anomalous))
                             for truth, p in zip(truths, preds)], np.float64)
              for cut in (DEFAULT_CUT, GROWN_CUT)}
    return {**cut_from_counts(counts, np.r_[np.zeros(len(validation), int), np.ones(len(outlined), int)]),
            "rule": rule, "defects": len(outlined), "validation_images": len(validation)}


def cut_from_counts(counts: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """The choice from each cut's per-image pixel (TP, FP, FN) on the same images (`labels`: 1 for a defect):
    the grown cut only if its pooled SegF1 minus MEBin's is above 0 beyond the 95 % paired bootstrap interval."""
    indices = resample_indices(labels, CUT_RESAMPLES)
    difference = resampled_seg_f1(counts[GROWN_CUT], indices) - resampled_seg_f1(counts[DEFAULT_CUT], indices)
    low, high = (float(q) for q in np.nanquantile(difference, [0.025, 0.975]))
    everyone = np.arange(len(labels))[None]  # the images as they are: one "resample" holding each once
    figures = {cut: float(resampled_seg_f1(c, everyone)[0]) for cut, c in counts.items()}
    chosen = GROWN_CUT if low > 0 else DEFAULT_CUT
    said = f"SegF1 {figures[GROWN_CUT]:.3f} against {figures[DEFAULT_CUT]:.3f}"
    return {"chosen": chosen, "seg_f1": figures, "grown_minus_mebin_95": [low, high],
            "why": f"{GROWN_CUT}: {said}, beyond the interval" if chosen == GROWN_CUT
                   else f"{DEFAULT_CUT}: {GROWN_CUT} not better beyond the interval ({said})"}
