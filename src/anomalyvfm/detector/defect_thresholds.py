"""Thresholds from a few labelled defects (`fit --calibration-defects DIR`), instead of normal images alone.

A plant often has a handful of real defect images with outlines. Normal images alone cannot say where a
defect's scores begin, only where normal ones end; with a few defects the thresholds can be put where they
separate the two best: the image threshold that maximises image F1 over the normal images (validation, and
the out-of-fold / added normal samples the model keeps) and the labelled defects, and the pixel threshold
that maximises SegF1 of the masks *the model outputs* over the validation maps (every pixel good) and the
defects' maps against their outlines.

The pixel threshold is judged through the model's own cut (`maps.binarize.model_mask`: MEBin by default, whose
floor it is, and outlines on rejected images only), not as a global cut: the threshold that is best for a
global cut is far too low a floor for MEBin (measured, docs/adaptation.md: on kolektor it took SegF1 from
0.535 to 0.052). MEBin has no closed form in its floor, so the candidates are few: the model's normal-only
threshold, the best global cut, and `CANDIDATES` quantiles of the defect pixels inside the outlines; on a
tie the earlier of these wins (the normal-only threshold first, the higher quantile before a lower one), so
labels move it only where they show a gain. Measured with ten defects, mean SegF1 of four categories: 0.437 →
0.461 on one set of draws (the global-cut choice: 0.392), 0.402 → 0.375 on another; with one to three it lost on
both (docs/adaptation.md) — not a reliable gain.

These are the user's labels, never test labels: the model records that labels were used
(`FitRecord.calibration_defects`) and the threshold evidence says so, so a report never mistakes them for
a normal-only model. DIR has the `test_public` layout: `bad/NAME.png` and `ground_truth/bad/NAME_mask.png`;
a `good/` folder in it is ignored.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from anomalyvfm import metrics as M
from anomalyvfm.data import list_images
from anomalyvfm.data.images import ImageLike, load_mask
from anomalyvfm.errors import UserInputError
from anomalyvfm.head.budget import BUDGET_SOURCES
from anomalyvfm.head.calibration import Thresholds
from anomalyvfm.maps.binarize import model_mask

CANDIDATES = 16  # quantiles of the outlined defect pixels tried as pixel thresholds (module docstring)
ADVISED_DEFECTS = 10  # measured: thresholds from 1-3 defects lowered SegF1 on two sets of draws, from 10 mixed
# A map's mask at a pixel threshold, given the image's verdict: the model's own cut (`maps.binarize.model_mask`).
Cut = Callable[[np.ndarray, float, bool], np.ndarray]


def read_defects(folder: str | Path, outlines: bool = True, what: str = "calibration defects") -> list[tuple[Path, Path | None]]:
    """(image, mask) pairs of a labelled-defects folder; one line naming the file for anything unusable.

    With `outlines=False` an image without a mask is a defect labelled without an outline (mask `None`).
    """
    folder = Path(folder)
    bad = folder / "bad"
    if not bad.is_dir():
        raise UserInputError(f"{folder}: no bad/ folder ({what} need bad/NAME.png and "
                             "ground_truth/bad/NAME_mask.png)")
    pairs: list[tuple[Path, Path | None]] = []
    for image in list_images(bad):
        mask = folder / "ground_truth" / "bad" / f"{image.stem}_mask.png"
        if outlines and not mask.is_file():
            raise UserInputError(f"{image}: no mask {mask} ({what} need an outline each)")
        pairs.append((image, mask if mask.is_file() else None))
    return pairs


class CalibrationDefectsWarning(UserWarning):
    """Thresholds are to be set on labelled defects in a way measured to lower SegF1 (`calibration_warnings`)."""


def calibration_warnings(folder: str | Path, defects: Any = None) -> list[str]:
    """One line each, said before a fit, when the thresholds are to be set on too few labelled defects in `folder`
    or on images the model also learns (`defects`, a `detector.defects.DefectSet`). Measured (docs/adaptation.md),
    mean SegF1 of four categories on draws 6-8 / 9-11: from one defect 0.432 -> 0.378 / 0.437 -> 0.357; from ten
    0.437 -> 0.461 / 0.402 -> 0.375; ten defects also learnt 0.424 -> 0.392 / 0.444 -> 0.432 against the same model
    without thresholds from them. Reading `folder` here also makes a bad one one line before the fit, not after."""
    images = [image for image, _ in read_defects(folder)]
    texts = []
    if len(images) < ADVISED_DEFECTS:
        texts.append(f"thresholds from {len(images)} labelled defects: with 1-3 they lowered SegF1 on the mean of four "
                     f"categories on both sets of draws measured, with {ADVISED_DEFECTS} they raised it on one and "
                     "lowered it on the other (docs/adaptation.md); compare with anomalyvfm evaluate")
    learnt = {Path(image).resolve() for image, _ in defects.pairs} if defects is not None else set()
    both = sum(Path(image).resolve() in learnt for image in images)
    if both:
        texts.append(f"{both} of the {len(images)} --calibration-defects images are also learnt (--defects): thresholds "
                     "set on them lowered SegF1 on both sets of draws measured; give images the model does not learn from")
    return texts


def read_outline(mask: Path, shape: tuple[int, int], what: str = "calibration defect") -> np.ndarray:
    """A labelled defect's mask at its image's `shape`; one line for a mask of another size or an empty one."""
    outline = load_mask(mask, shape)
    if not outline.any():
        raise UserInputError(f"{mask}: the mask outlines nothing (a {what} needs its defect outlined)")
    return outline


def defect_thresholds(normal_scores: np.ndarray, normal_maps: Sequence[np.ndarray], defect_scores: np.ndarray,
                      defect_maps: Sequence[np.ndarray], defect_masks: Sequence[np.ndarray], cut: Cut,
                      normal_pixel_threshold: float) -> tuple[float, float, dict[str, Any]]:
    """(image threshold, pixel threshold, evidence): the image threshold of best image F1 over normal images and
    labelled defects (`metrics.f1_max`, here on the user's labels, not on a test set), then the pixel threshold
    whose masks — `cut` at the verdicts of that image threshold — reach the best pooled SegF1 (module docstring).

    `normal_scores` may hold more images than `normal_maps` (kept normal samples without maps)."""
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(defect_scores))]
    image_f1, image_t = M.f1_max(labels, np.r_[normal_scores, defect_scores])
    truths = [np.zeros(m.shape, bool) for m in normal_maps] + list(defect_masks)
    maps = [*normal_maps, *defect_maps]
    flagged = np.r_[normal_scores[:len(normal_maps)], defect_scores] > image_t
    inside = np.concatenate([m[t] for m, t in zip(defect_maps, defect_masks)]).astype(np.float64)
    candidates = dict.fromkeys([normal_pixel_threshold, M.seg_f1_max(truths, maps)[1],
                                *np.quantile(inside, np.linspace(0.9, 0.0, CANDIDATES))])
    seg_f1 = {float(t): M.seg_f1_masks(truths, (cut(m, float(t), bool(f)) for m, f in zip(maps, flagged)))
              for t in candidates if np.isfinite(t)}
    pixel_t = max(seg_f1, key=seg_f1.get)  # the first of the best: the normal-only threshold on a tie
    where = f"{len(defect_scores)} labelled defects"
    evidence = {
        "image": {"rule": "defects", "defects": len(defect_scores), "normal": len(normal_scores), "f1": image_f1,
                  "text": f"{image_t:.6g} = best image F1 ({image_f1:.3f}) over {len(normal_scores)} normal image "
                          f"scores and {where}"},
        "pixel": {"rule": "defects", "defects": len(defect_scores), "normal": len(normal_maps), "f1": seg_f1[pixel_t],
                  "text": f"{pixel_t:.6g} = best SegF1 ({seg_f1[pixel_t]:.3f}) of the model's masks over "
                          f"{len(normal_maps)} normal maps and the outlines of {where}, among {len(seg_f1)} "
                          f"thresholds (normal-only {normal_pixel_threshold:.6g})"},
    }
    return float(image_t), float(pixel_t), evidence


def model_cut(settings: Any, thresholds: Thresholds) -> Cut:
    """The masks a model with `settings` (`Settings` or `HeadConfig`) and `thresholds` outputs, at another pixel
    threshold: what `defect_thresholds` judges each candidate by."""
    return lambda amap, pixel_t, flagged: model_mask(amap, settings, replace(thresholds, pixel_threshold=pixel_t),
                                                     flagged)


def calibrate_on_defects(predictor: Any, validation: Sequence[ImageLike], folder: str | Path) -> tuple[Thresholds, dict]:
    """The fitted `predictor`'s thresholds set from the labelled defects in `folder` (module docstring), and
    the record of what was used."""
    pairs = read_defects(folder)  # (an empty bad/ is already one line there)
    old = predictor.thresholds()

    def predicted(images: Sequence[ImageLike], what: str) -> list:
        preds = list(predictor.predict_iter(list(images), f"thresholds ({what})", decide=False))
        failed = next((p for p in preds if p.error), None)
        if failed is not None:
            raise UserInputError(f"{what} image unreadable: {failed.error}")
        return preds

    normal, defects = predicted(validation, "validation"), predicted([image for image, _ in pairs], "defects")
    masks = [read_outline(mask, pred.anomaly_map.shape) for (_, mask), pred in zip(pairs, defects)]
    kept = [v for source in BUDGET_SOURCES for v in old.normal_samples.get(source, {}).get("image", [])]
    image_t, pixel_t, evidence = defect_thresholds(
        np.r_[[p.score for p in normal], kept], [p.anomaly_map for p in normal],
        np.array([p.score for p in defects]), [p.anomaly_map for p in defects], masks,
        model_cut(predictor.settings, old), old.pixel_threshold)
    record = {"folder": str(folder), "images": len(pairs), "image_f1": evidence["image"]["f1"],
              "seg_f1": evidence["pixel"]["f1"]}
    return replace(old, image_threshold=image_t, pixel_threshold=pixel_t, evidence=evidence), record
