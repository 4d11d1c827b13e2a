"""Learning from a plant's labelled real defects at fit time (`fit --defects DIR`, `--defects-from-store URL`).

The fitted normal model scores each labelled defect image; the patches that make the defect (inside its
outline, or its top patches when it was labelled without one) and score clearly above normal are kept as a
defect memory bank in the scoring head (`head.defects`: how they raise a patch's score, and why a patch
nearer normal than any known defect keeps its score). How much they raise it — the weight `w` — is chosen by
one rule fixed before any run, on held-out folds of the labelled defects and the validation images only:

* leave one labelled defect out, learn the bank from the others, and score the held-out defect and every
  validation image with each candidate weight (`WEIGHTS`; 0 is the model without defects);
* a fold's figure is the mean of the held-out image's rank among the validation image scores (the image
  AUROC of one defect against the good parts) and, when it is outlined, AU-PRO(0.05) of its map against the
  validation maps;
* the weight with the highest mean over the folds wins; a tie goes to the smaller weight. With a single
  labelled defect there is no fold: `head.defects.DEFAULT_WEIGHT`. A chosen 0 keeps no bank at all.

A weight the user gives (`--defect-weight`) is used as given. The weight is a setting: the chosen one is
written into the model's settings, the figures behind the choice into its fit record.

Then the calibration is fitted again on the validation images (their features are kept from the choice), since
view statistics and thresholds are taken from the scores the head now gives. The defects never set a threshold —
that stays `--calibration-defects`, a separate choice the model records separately.

A defect set is a folder in the `test_public` layout (`bad/NAME.png`, `ground_truth/bad/NAME_mask.png`, a
`good/` folder ignored; an image without a mask is a defect labelled without an outline), or the inspections an
operator labelled "defect" in the inspection store (their kept images, without outlines).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomalyvfm import metrics as M
from anomalyvfm.data import load_rgb
from anomalyvfm.detector.calibration import calibrate_scored
from anomalyvfm.detector.defect_thresholds import read_defects, read_outline
from anomalyvfm.errors import UserInputError
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.head.defects import DEFAULT_WEIGHT, FLOOR_SIGMA, DefectEvidence, ScoredImage, bank_key, defect_bank
from anomalyvfm.head.head import ScoringHead
from anomalyvfm.prediction import ImageViews

WEIGHTS = (0.0, 1.0, 2.0, 4.0)  # candidate weights of the defect evidence, fixed before any run
FPR_LIMIT = 0.05  # AU-PRO's false-positive-rate limit in the choice (MVTec AD 2's)


@dataclass(frozen=True)
class DefectSet:
    """Labelled defect images to learn from: `(image, outline at its size or None)` pairs and their source."""

    source: str
    pairs: tuple[tuple[Path, np.ndarray | None], ...]


def defects_from_folder(folder: str | Path) -> DefectSet:
    """A folder's labelled defects, every image and mask read now (before a fit, not after it); one line
    naming the file for anything unusable."""
    pairs = []
    for image, mask in read_defects(folder, outlines=False, what="defects"):
        shape = load_rgb(image).shape[:2]
        pairs.append((image, None if mask is None else read_outline(mask, shape, "defect")))
    return DefectSet(str(folder), tuple(pairs))


def defects_from_store(url: str, store) -> DefectSet:
    """The inspections labelled "defect" in an open inspection store (`store.InspectionStore`), as defects
    without outlines; one line when there are none or their images were not kept."""
    found = store.labelled("defect")
    kept = [item.image_path for item in found if item.image_path is not None and item.image_path.is_file()]
    if not found:
        raise UserInputError(f"{url}: no inspection is labelled defect (nothing to learn from)")
    if not kept:
        raise UserInputError(f"{url}: the images of the {len(found)} inspections labelled defect were not kept "
                             "(--keep-images none keeps none)")
    return DefectSet(url, tuple((path, None) for path in kept))


def scored_images(head: ScoringHead, views: Sequence[ImageViews], masks: Sequence[np.ndarray | None]) -> list[ScoredImage]:
    """Images' features as a head without defects scores them."""
    return [ScoredImage(head.score_views(v.views, v.source, v.processed_shape, v.image_shape), v.views, mask)
            for v, mask in zip(views, masks)]


def check_defects_allowed(settings) -> None:
    """Refuse, before a fit, settings the defect bank does not combine with (one line)."""
    if settings.out_of_fold:
        raise UserInputError("--defects with --threshold-rule budget is not supported: the out-of-fold scores "
                             "are taken before the defects are learnt; choose another --threshold-rule")
    if settings.lora is not None:
        raise UserInputError("--defects with --lora is not supported: the defect bank raises distance scores, "
                             "which the LoRA heads' score modes do not use alone")


def fit_defects(pipeline, calibration: Calibration, defects: DefectSet, validation: Sequence, mode: str,
                progress: bool) -> tuple[Calibration, dict[str, Any]]:
    """Learn `defects` into the fitted `pipeline`'s head and refit the calibration on `validation`; return it
    and the record of what was learnt (module docstring)."""
    views = {}
    for what, images in (("validation", validation), ("defect", [image for image, _ in defects.pairs])):
        views[what] = list(pipeline.image_views(images, f"features ({what})" if progress else None))
        failed = next((v for v in views[what] if v.error), None)
        if failed is not None:
            raise UserInputError(f"{what} image unreadable: {failed.error}")
    normal = scored_images(pipeline.head, views["validation"], [None] * len(validation))
    found = scored_images(pipeline.head, views["defect"], [mask for _, mask in defects.pairs])
    arrays, record = learn_defects(pipeline.head, calibration, found, normal, defects.source,
                                   pipeline.settings.defect_weight)
    pipeline.use_head_arrays(arrays)
    pipeline.configure(defect_weight=record["weight"])
    rescored = [pipeline.head.score_views(v.views, v.source, v.processed_shape, v.image_shape) for v in views["validation"]]
    return calibrate_scored(pipeline, rescored, mode), record


def learn_defects(head: ScoringHead, calibration: Calibration, defects: Sequence[ScoredImage],
                  validation: Sequence[ScoredImage], source: str,
                  weight: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The head's arrays with the defect bank added (none if the weight is 0), and the record of what was learnt:
    the weight (`weight`, else chosen) and why."""
    floors = [stats["mean"] + FLOOR_SIGMA * stats["std"] for stats in calibration.view_stats]
    arrays = head.state_dict()
    banks, kept = defect_bank(arrays, head.config.scorer, defects, floors, head.config.top_percent)
    choice = ({"chosen": weight, "rule": "given (--defect-weight)"} if weight is not None else
              choose_weight(head, calibration, defects, validation, floors))
    record = {"source": source, "images": len(defects), "outlined": sum(d.mask is not None for d in defects),
              "patches_per_view": [len(banks.get(bank_key(view), ())) for view in range(len(floors))],
              "floors": [float(f) for f in floors], "weight": choice["chosen"], "choice": choice,
              "images_without_kept_patches": [d.scored.source for d, rows in zip(defects, kept) if not any(rows)]}
    return (arrays if choice["chosen"] == 0 else {**arrays, **banks}), record


def choose_weight(head: ScoringHead, calibration: Calibration, defects: Sequence[ScoredImage],
                  validation: Sequence[ScoredImage], floors: Sequence[float]) -> dict[str, Any]:
    """The defect evidence's weight by leave-one-defect-out on the labelled defects (module docstring)."""
    folds = []
    for held in range(len(defects) if len(defects) > 1 else 0):
        others = [d for i, d in enumerate(defects) if i != held]
        figures = fold_figures(head, calibration, defects[held], others, validation, floors)
        if figures is not None:
            folds.append(figures)
    if not folds:
        return {"chosen": DEFAULT_WEIGHT, "rule": "no held-out fold (fewer than 2 labelled defects with kept "
                                                  "patches): the default weight", "folds": 0}
    means = {w: float(np.mean([fold[i] for fold in folds])) for i, w in enumerate(WEIGHTS)}
    chosen = max(WEIGHTS, key=lambda w: (means[w], -w))
    return {"chosen": chosen, "folds": len(folds), "figures": {str(w): m for w, m in means.items()},
            "rule": "leave one labelled defect out: mean of its image AUROC against the validation images and its "
                    f"AU-PRO({FPR_LIMIT}) against their maps; ties: the smaller weight"}


def fold_figures(head: ScoringHead, calibration: Calibration, held: ScoredImage, others: Sequence[ScoredImage],
                 validation: Sequence[ScoredImage], floors: Sequence[float]) -> list[float] | None:
    """One fold's figure for each candidate weight (None when the other defects keep no patch)."""
    arrays = head.state_dict()
    banks, _ = defect_bank(arrays, head.config.scorer, others, floors, head.config.top_percent)
    if not banks:
        return None
    evidence = DefectEvidence(banks, [head.gaussian(view) for view in range(len(floors))])

    def judged(image: ScoredImage) -> list:
        """The image's prediction (score, map) at every weight, judged once where the bank changes nothing."""
        nearest, frozen = evidence.nearest(image), head.judge(image.scored, calibration)
        return [frozen if scored is image.scored else head.judge(scored, calibration)
                for scored in (evidence.raised(image, nearest, w) for w in WEIGHTS)]

    normal, defect = [judged(image) for image in validation], judged(held)
    figures = []
    for i in range(len(WEIGHTS)):
        scores = np.array([preds[i].score for preds in normal])
        parts = [float(np.mean(scores < defect[i].score) + 0.5 * np.mean(scores == defect[i].score))]
        if held.mask is not None:
            masks = [np.zeros(preds[i].anomaly_map.shape, bool) for preds in normal] + [held.mask]
            parts.append(M.aupro(masks, [preds[i].anomaly_map for preds in normal] + [defect[i].anomaly_map], FPR_LIMIT))
        figures.append(float(np.mean(parts)))
    return figures
