"""Learning from a plant's labelled real defects at fit time (`fit --defects DIR`, `--defects-from-store URL`).

The fitted normal model scores each labelled defect image; the patches that make the defect (inside its
outline, or its top patches when it was labelled without one) and score clearly above normal are what is
learnt, as one of two kinds of defect evidence (`head.defects`): a **bank** of those patches, or a **linear**
head (logistic regression on the frozen features, the kept patches against the normal bank's rows, classes
weighted equally — the "heads alone on frozen features" of the adaptation study, here on real defects). Which
kind, and how much it raises a patch's score (the weight `w`), is chosen by one rule fixed before any run, on
held-out folds of the labelled defects and the validation images only:

* cross-validated predictions: each labelled defect is scored under every candidate (no defect evidence, or
  either kind at each weight of `WEIGHTS`) as learnt from the *other* defects, and every validation image as
  learnt from all of them; pooled, they look like a small test set, so the false positives a raised region
  puts *around* a defect weigh as they will in use (the defective images' own normal pixels);
* a candidate's figure is the mean of the pool's image AUROC and, over its outlined defects, its AU-PRO(0.05)
  (maps averaged down to `CHOICE_SIDE` px a side: the choice ranks candidates, the study reports exact figures);
* a candidate must beat "none" beyond the 95 % paired bootstrap interval over the pool's images (resampled
  within each label); of those that do, the highest figure wins (equal figures: the first of bank, linear,
  the smaller weight); if none does, "none": the model stays the normal-only one, with the record saying why. A
  few defects can rarely show a gain beyond the interval, so they rarely change the model — a model with
  defects must not be worse than one without. With a single labelled defect there is no fold, so nothing is
  learnt (`--defect-weight` forces a bank). Until this rule a single defect gave a bank at weight 1: image AUROC and
  AU-PRO stayed within 0.005 of the frozen model on four categories, but SegF1 fell by 0.04 on two under MEBin masks
  (docs/adaptation.md) — an unchecked change, which this rule does not make.

(Before, each fold's figure was one held-out defect against the validation images alone, and the best mean
won without an interval: on bottle and magnetic_tile it chose evidence that lost AU-PRO on test_public, the
defects' surroundings being raised with them. A figure that also weighed SegF1 was measured on fresh draws and lost
to this one: over ~10 held-out defects the pool's SegF1 follows its largest defect. docs/adaptation.md has every
rule's figures.)

With `--lora`, the labelled defects are learnt by the backbone instead: LoRA + heads are trained on crops of the
outlined defects beside the synthetic anomalies (`adaptation.training`, the adaptation study's other arm), and
no bank or linear evidence is added; the user chooses this arm (`--lora`), no rule does: a held-out fold would
mean one LoRA training per labelled defect, hours on a line PC's CPU. The heads' evidence then enters the
score through score mode `fusion` (`--score fusion`), the adapted features through every mode.

Beside the patch evidence, the image score learns from the defects too: whenever `MIN_IMAGE_DEFECTS` of them keep
patches, their bank also enters the image score as a standardised term (`head.defects`, "image defect evidence"),
whichever patch evidence the rule above chose — even none, since raising patches barely moves the image score.
This is a fixed rule, not a choice on folds: on held-out folds of ten defects and 9–17 validation images, image
AUROC could not tell it from the patch score alone (in a design look the folds said "worse" on a category where the
test said "better"); it was judged once, on fresh draws (docs/adaptation.md).

A weight the user gives (`--defect-weight`) is used as given. The weight is a setting: the chosen one is
written into the model's settings, the figures behind the choice into its fit record.

The mask cut is chosen from the outlined defects too (`detector.defect_cut`: MEBin, or MEBin grown to a good
part's level when the defects are broad faint domes), by its own rule, on the normal model's outlines.

Then the calibration is fitted again on the validation images (their features are kept from the choice), since
view statistics and thresholds are taken from the scores the head now gives. The defects never set a threshold —
that stays `--calibration-defects`, a separate choice the model records separately.

A defect set is a folder in the `test_public` layout (`bad/NAME.png`, `ground_truth/bad/NAME_mask.png`, a
`good/` folder ignored; an image without a mask is a defect labelled without an outline), or the inspections an
operator labelled "defect" in the inspection store (their kept images, without outlines).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomalyvfm import metrics as M
from anomalyvfm.data import load_rgb
from anomalyvfm.data.resample import block_means
from anomalyvfm.detector.calibration import calibrate_scored
from anomalyvfm.detector.defect_cut import choose_cut
from anomalyvfm.detector.defect_thresholds import read_defects, read_outline
from anomalyvfm.errors import UserInputError
from anomalyvfm.metrics.bootstrap import resample_indices, resampled
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.head.defects import (FLOOR_SIGMA, DefectEvidence, ScoredImage, bank_key, defect_bank, image_bank_key,
                                     linear_keys)
from anomalyvfm.head.head import ScoringHead
from anomalyvfm.prediction import ImageViews
from anomalyvfm.scoring.distances import unit_rows

WEIGHTS = (1.0, 2.0, 4.0)  # candidate weights of each kind of defect evidence, fixed before any run
KINDS = ("bank", "linear")  # `head.defects`; the linear head needs a kNN bank (its negatives)
NEGATIVES = 20_000  # normal bank rows a linear head is trained against (a seeded sample of larger banks)
CHOICE_SIDE = 128  # the choice's AU-PRO is taken on maps averaged down to this many px a side (`coarse`)
FPR_LIMIT = 0.05  # AU-PRO's false-positive-rate limit in the choice (MVTec AD 2's)
CHOICE_RESAMPLES = 500  # bootstrap resamples of the choice's paired interval
# labelled defects with kept patches before the image score learns from them: in a design look (draws 0-2) the term
# moved the mean image AUROC by -0.002 / -0.001 / -0.002 / +0.014 with 1 / 3 / 5 / 10 defects (docs/adaptation.md)
MIN_IMAGE_DEFECTS = 10
# the mirrored copies `--defect-flips` learns beside each labelled defect: left-right, up-down, both (a half turn)
FLIPS = ((slice(None), slice(None, None, -1)), (slice(None, None, -1),), (slice(None, None, -1), slice(None, None, -1)))


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


def with_flipped_copies(pipeline, found: Sequence[ScoredImage], defects: DefectSet,
                        progress: bool) -> list[ScoredImage]:
    """The scored labelled defects `found` (of `defects`, in order), each with its mirrored copies attached
    (`ScoredImage.copies`: left-right, up-down, both), image and outline flipped alike. A defect's copies are
    featured together, so memory holds one defect's copies at a time, not every image of the set."""
    from tqdm.auto import tqdm

    result = []
    for defect, (image, mask) in tqdm(list(zip(found, defects.pairs)), desc="features (flipped defects)",
                                      disable=not progress, unit="img"):
        rgb = load_rgb(image)
        copies = [(np.ascontiguousarray(rgb[flip]), None if mask is None else np.ascontiguousarray(mask[flip]))
                  for flip in FLIPS]
        views = list(pipeline.image_views([copy for copy, _ in copies], None))
        result.append(replace(defect, copies=tuple(scored_images(pipeline.head, views, [m for _, m in copies]))))
    return result


def check_defects_allowed(settings, defects: DefectSet) -> None:
    """Refuse, before a fit, settings the labelled defects do not combine with (one line)."""
    if settings.out_of_fold:
        raise UserInputError("--defects with --threshold-rule budget is not supported: the out-of-fold scores "
                             "are taken before the defects are learnt; choose another --threshold-rule")
    if settings.lora is not None and settings.defect_weight is not None:
        raise UserInputError("--defect-weight sets the weight of a defect bank; with --lora the defects train the "
                             "adapter and heads instead: give one of them")
    if settings.lora is not None and not outlined(defects):
        raise UserInputError(f"{defects.source}: --lora learns real defects from their outlines, and none of its "
                             f"{len(defects.pairs)} defects has one (without --lora they are learnt as weak labels)")


def outlined(defects: DefectSet | None) -> list[tuple[Path, np.ndarray]]:
    """The outlined labelled defects (image, outline) that LoRA training cuts anomalous crops from."""
    return [] if defects is None else [(image, mask) for image, mask in defects.pairs if mask is not None]


def lora_record(defects: DefectSet) -> dict[str, Any]:
    """What a fit with `--lora` did with the labelled defects: trained the adapter and heads on the outlined ones."""
    used = len(outlined(defects))
    return {"source": defects.source, "images": len(defects.pairs), "outlined": used, "kind": "lora",
            "rule": f"LoRA + heads trained on crops of the {used} outlined defects beside the synthetic anomalies "
                    "(score mode fusion uses the heads); no defect bank, no weight"}


def fit_defects(pipeline, calibration: Calibration, defects: DefectSet, validation: Sequence, mode: str,
                progress: bool) -> tuple[Calibration, dict[str, Any]]:
    """Learn `defects` into the fitted `pipeline`'s head and refit the calibration on `validation`; return it
    and the record of what was learnt (module docstring). A LoRA fit has learnt them in training: its record only."""
    if pipeline.settings.lora is not None:
        return calibration, lora_record(defects)
    views = {}
    for what, images in (("validation", validation), ("defect", [image for image, _ in defects.pairs])):
        views[what] = list(pipeline.image_views(images, f"features ({what})" if progress else None))
        failed = next((v for v in views[what] if v.error), None)
        if failed is not None:
            raise UserInputError(f"{what} image unreadable: {failed.error}")
    normal = scored_images(pipeline.head, views["validation"], [None] * len(validation))
    found = scored_images(pipeline.head, views["defect"], [mask for _, mask in defects.pairs])
    if pipeline.settings.defect_flips:
        found = with_flipped_copies(pipeline, found, defects, progress)
    arrays, record = learn_defects(pipeline.head, calibration, found, normal, defects.source,
                                   pipeline.settings.defect_weight)
    pipeline.use_head_arrays(arrays)
    pipeline.configure(defect_weight=record["weight"], binarize=record["cut"]["chosen"])
    rescored = [pipeline.head.score_views(v.views, v.source, v.processed_shape, v.image_shape) for v in views["validation"]]
    return calibrate_scored(pipeline, rescored, mode), record


def learn_defects(head: ScoringHead, calibration: Calibration, defects: Sequence[ScoredImage],
                  validation: Sequence[ScoredImage], source: str,
                  weight: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The head's arrays with the chosen defect evidence added (nothing if the weight is 0), and the record of
    what was learnt: kind and weight (`weight` given: a bank at that weight; else chosen) and why, and the mask cut
    the defects chose (`detector.defect_cut`; the caller configures it)."""
    learner = Learner(head, calibration)
    choice = ({"kind": "bank", "weight": weight, "rule": "given (--defect-weight): a defect bank"}
              if weight is not None else choose(learner, defects, validation))
    learnt, kept = learner.learn(choice["kind"], defects)
    image, image_record = image_bank(learner, defects, weight)
    cut = choose_cut(head, calibration, defects, validation)
    record = {"source": source, "images": len(defects), "outlined": sum(d.mask is not None for d in defects),
              "copies": sum(len(d.copies) for d in defects),
              "patches_per_view": [int(sum(rows[v] for rows in kept)) for v in range(len(learner.floors))],
              "floors": [float(f) for f in learner.floors], "kind": choice["kind"], "weight": choice["weight"],
              "choice": choice, "image_evidence": image_record, "cut": cut,
              "images_without_kept_patches": [d.scored.source for d, rows in zip(defects, kept) if not any(rows)]}
    arrays = head.state_dict()
    return {**arrays, **({} if choice["weight"] == 0 else learnt), **image}, record


def image_bank(learner: Learner, defects: Sequence[ScoredImage], weight: float | None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The image defect bank (`head.defects`: the image score's "defects" term) and its record: the kept defect
    patches, whenever `MIN_IMAGE_DEFECTS` labelled defects keep any and the user did not set the weight to 0."""
    banks, kept = learner.learn("bank", defects)
    images = sum(any(rows) for rows in kept)
    rule = (f"the image score adds the defect evidence term when {MIN_IMAGE_DEFECTS} or more labelled defects keep "
            "patches (fixed before the run that judged it; --defect-weight 0 turns it off)")
    if weight == 0 or images < MIN_IMAGE_DEFECTS:
        why = "--defect-weight 0" if weight == 0 else f"{images} labelled defects kept patches, fewer than {MIN_IMAGE_DEFECTS}"
        return {}, {"learnt": False, "images": images, "rule": rule, "why": f"; the image score is unchanged ({why})"}
    views = range(len(learner.floors))
    return ({image_bank_key(v): banks[bank_key(v)] for v in views if bank_key(v) in banks},
            {"learnt": True, "images": images, "rule": rule, "why": f"; the image score adds their defect evidence ({images} "
                                                                     "images)"})


class Learner:
    """Learns either kind of defect evidence (`head.defects`) from labelled defects for one fitted head."""

    def __init__(self, head: ScoringHead, calibration: Calibration) -> None:
        self.head, self.calibration, self.arrays = head, calibration, head.state_dict()
        self.floors = [stats["mean"] + FLOOR_SIGMA * stats["std"] for stats in calibration.view_stats]
        self.kinds = KINDS if head.config.scorer == "knn" else ("bank",)  # the linear head's negatives: bank rows

    def learn(self, kind: str, defects: Sequence[ScoredImage]) -> tuple[dict[str, np.ndarray], list[list[int]]]:
        """The arrays of `kind` learnt from `defects`, and the patches kept per image and view."""
        banks, kept = defect_bank(self.arrays, self.head.config.scorer, defects, self.floors, self.head.config.top_percent)
        if kind == "bank":
            return banks, kept
        learnt = {}
        for view in range(len(self.floors)):
            if bank_key(view) in banks:
                learnt.update(zip(linear_keys(view), linear_head(banks[bank_key(view)], self.arrays[f"view{view}.bank"])))
        return learnt, kept

    def evidence(self, learnt: dict[str, np.ndarray]) -> DefectEvidence:
        return DefectEvidence(learnt, [self.head.gaussian(view) for view in range(len(self.floors))])


def linear_head(defect: np.ndarray, normal: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(direction, bias) of a logistic head on unit-norm features: defect rows against (up to `NEGATIVES` of)
    the normal bank's rows, the classes weighted equally, L2-regularised (sklearn's default C = 1)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    normal = normal[rng.choice(len(normal), NEGATIVES, replace=False)] if len(normal) > NEGATIVES else normal
    x = np.concatenate([unit_rows(defect), unit_rows(normal)])
    y = np.r_[np.ones(len(defect)), np.zeros(len(normal))]
    model = LogisticRegression(class_weight="balanced", max_iter=500).fit(x, y)
    return model.coef_[0].astype(np.float32), model.intercept_.astype(np.float32)


def choose(learner: Learner, defects: Sequence[ScoredImage], validation: Sequence[ScoredImage]) -> dict[str, Any]:
    """The kind and weight of the defect evidence by pooled cross-validated predictions (module docstring)."""
    candidates = [("bank", 0.0)] + [(kind, w) for kind in learner.kinds for w in WEIGHTS if w > 0]
    held = []  # (defect, its predictions under each candidate learnt from the other defects)
    for i in range(len(defects) if len(defects) > 1 else 0):
        evidence = learnt_evidence(learner, [d for j, d in enumerate(defects) if j != i])
        if evidence is not None:
            held.append((defects[i], judged(learner, evidence, candidates, defects[i])))
    if not held:
        return {"kind": "bank", "weight": 0.0, "folds": 0,
                "rule": "no held-out fold (fewer than 2 labelled defects with kept patches), so nothing could be checked "
                        "and nothing is learnt; --defect-weight W learns a bank anyway"}
    everything = learnt_evidence(learner, defects)
    normal = [judged(learner, everything, candidates, image) for image in validation]
    figures, differences = pooled_figures(candidates, normal, held)
    beyond = [i for i in range(1, len(candidates)) if differences[i][0] > 0]
    best = max(beyond, key=lambda i: (figures[i], -i), default=0)  # equal figures: the earlier candidate
    kind, weight = candidates[best]
    name = [f"{k} {w:g}" if w else "none" for k, w in candidates]
    return {"kind": kind, "weight": weight, "folds": len(held),
            "figures": dict(zip(name, figures)),
            "minus_none_95": {n: d for n, d in zip(name[1:], differences[1:])},
            "rule": "pooled held-out predictions (each labelled defect scored by what the others taught, the validation "
                    f"images by what all taught): mean of image AUROC and AU-PRO({FPR_LIMIT}); a candidate must beat none "
                    f"beyond the 95 % paired bootstrap interval over images, then the highest figure wins"}


def learnt_evidence(learner: Learner, defects: Sequence[ScoredImage]) -> dict[str, DefectEvidence] | None:
    """Each kind's evidence learnt from `defects` (None when they keep no patch)."""
    evidence = {}
    for kind in learner.kinds:
        learnt, _ = learner.learn(kind, defects)
        if not learnt:
            return None
        evidence[kind] = learner.evidence(learnt)
    return evidence


def judged(learner: Learner, evidence: dict[str, DefectEvidence], candidates: list[tuple[str, float]],
           image: ScoredImage) -> list:
    """The image's prediction (score, map averaged down by `coarse`) under every candidate, judged once where
    nothing changes."""
    head, calibration = learner.head, learner.calibration
    frozen, of = head.judge(image.scored, calibration), {kind: e.of(image) for kind, e in evidence.items()}
    preds = [frozen if scored is image.scored else head.judge(scored, calibration)
             for scored in (DefectEvidence.raised(image, of[kind], w) for kind, w in candidates)]
    return [(p.score, coarse(p.anomaly_map).astype(np.float16)) for p in preds]


def pooled_figures(candidates: list, normal: list[list], held: list[tuple[ScoredImage, list]]
                   ) -> tuple[list[float], list[list[float]]]:
    """Each candidate's figure on the pooled predictions, and the 95 % paired bootstrap interval of its figure
    minus the first candidate's (none), over the same resamples of the images (within each label)."""
    labels = np.r_[np.zeros(len(normal), int), np.ones(len(held), int)]
    outlined = np.r_[np.ones(len(normal), bool), [d.mask is not None for d, _ in held]]
    truths = ([np.zeros(amap.shape, bool) for _, amap in (preds[0] for preds in normal)]
              + [np.zeros(p[0][1].shape, bool) if d.mask is None else coarse(d.mask.astype(np.float32)) > 0
                 for d, p in held])
    indices = resample_indices(labels, CHOICE_RESAMPLES)
    figures, resamples = [], []
    for c in range(len(candidates)):
        preds = [p[c] for p in normal] + [p[c] for _, p in held]
        scores, maps = [s for s, _ in preds], [m for _, m in preds]
        whole = M.evaluate_images(labels, scores, truths, maps, np.inf, np.inf)
        parts = [(whole[0]["image_auroc"], resampled(whole[1], indices, ("image_auroc",))["image_auroc"])]
        if outlined[len(normal):].any():
            pixels = whole if outlined.all() else M.evaluate_images(
                labels[outlined], np.array(scores)[outlined], [t for t, o in zip(truths, outlined) if o],
                [m for m, o in zip(maps, outlined) if o], np.inf, np.inf)
            parts.append((pixels[0][f"aupro_{FPR_LIMIT}"],
                          resampled(pixels[1], indices, (f"aupro_{FPR_LIMIT}",), outlined)[f"aupro_{FPR_LIMIT}"]))
        figures.append(float(np.mean([figure for figure, _ in parts])))
        resamples.append(np.mean([values for _, values in parts], axis=0))
    differences = [[float(q) for q in np.nanquantile(r - resamples[0], [0.025, 0.975])] for r in resamples]
    return figures, differences


def coarse(image: np.ndarray) -> np.ndarray:
    """A map (or mask) averaged over blocks to at most `CHOICE_SIDE` px a side: the choice only ranks candidates,
    and exact AU-PRO over full-size maps cost 95 % of its time (ball_screw_drive, 10 defects: 235 of 249 s).
    A mask block holding any defect pixel counts as defect, so thin cracks survive."""
    scale = max(image.shape) / CHOICE_SIDE
    if scale <= 1:
        return image
    return block_means(image, (max(1, round(image.shape[0] / scale)), max(1, round(image.shape[1] / scale))))
