"""Known defects as evidence beside the normal model (numpy only): a defect memory bank or a linear defect head.

A plant that has confirmed a few real defects should score the next defect *like them* higher than the
normal model alone would. The normal scorer measures how far a patch is from normal (`d_n`: cosine distance
to the kNN bank, or Mahalanobis distance). The learnt parts give each patch a defect evidence `e` in [0, 1],
and its score becomes

    d_n · (1 + w · e)

Two kinds of evidence (the fit chooses one, `detector.defects`):

* **bank** (`defects.view<i>.bank`): the kept defect patches; `d_d` is the distance to the nearest of them in
  the normal scorer's *own* geometry (cosine for kNN; Euclidean in the Mahalanobis whitened space) and
  `e = max(0, 1 - d_d / d_n)`, so the score is `d_n + w · max(0, d_n - d_d)`: raised only where the patch is
  closer to a known defect than to anything normal, by how much closer;
* **linear** (`defects.view<i>.direction`, `.bias`, kNN models): a logistic head on the unit-norm features,
  trained on the kept defect patches against the normal bank's rows; `e` is its probability. It generalises
  along a direction (a kind of defect) where the bank needs a near copy.

The evidence multiplies the distance, in the distance's own units, so everything downstream (view
standardisation on validation, image score, thresholds, maps) is unchanged, and a patch that is close to
normal stays close to normal whatever the evidence says: a model with defects cannot turn ordinary texture
into an alarm. The weight `w` is a setting (`Settings.defect_weight`); 0 means the defects did not help on
held-out labelled defects, and then nothing is kept.

The bank's rows are stored as features (unit-norm for kNN); the Mahalanobis geometry is applied when a head
is built (`prepared_bank`), so a Gaussian that `anomalyvfm update` grows moves the defect rows with it.

Which patches are kept, per view (`defect_rows`):
* a patch the outline touches (its mask fraction, `data.resample.block_means`, is above zero) — or, for an
  image labelled without an outline, one of the top `top_percent` % of its patches (the patches its image
  score is made of: "somewhere in this image", multiple-instance style);
* and whose own normal distance is at least the view's *floor*: mean + 3 std of the view's validation patch
  scores (`Calibration.view_stats`). A patch inside an outline that scores like normal texture (an outline
  drawn generously, a faint defect) would otherwise teach that normal texture is a defect.

The image score learns from them too (`defects.image.view<i>.bank`, kept whenever ten or more labelled
defects keep patches, whatever the patch evidence chosen: `detector.defects.MIN_IMAGE_DEFECTS`): the image's *defect evidence* is the mean over
views of its top `top_percent` % patches' bank evidence `e` (as above, on the normal distances), and enters
the image score as one more standardised term beside the patch score (`scoring.image_evidence`, term
"defects"). Raising patch scores alone barely moves the image score: the top patches of a good image are
raised too (docs/adaptation.md); a term standardised on the validation images asks instead how much nearer
known defects this image's top patches are than a good image's.

The arrays are stored with the head's, so the model directory, every exported backbone form and the service
carry them with no code of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from anomalyvfm.data.resample import block_means
from anomalyvfm.head.scores import ViewScores
from anomalyvfm.scoring.distances import CHUNK, knn_distance, unit_rows
from anomalyvfm.scoring.pooling import image_score

FLOOR_SIGMA = 3.0  # kept defect patches score at least mean + FLOOR_SIGMA std of validation patches (per view)
DEFAULT_WEIGHT = 1.0  # a patch as near a known defect as it is far from normal counts double


def bank_key(view: int) -> str:
    return f"defects.view{view}.bank"


def linear_keys(view: int) -> tuple[str, str]:
    return f"defects.view{view}.direction", f"defects.view{view}.bias"


def image_bank_key(view: int) -> str:
    return f"defects.image.view{view}.bank"


@dataclass(frozen=True)
class ScoredImage:
    """One image as a head without defects scored it (`scored.grids`: every view's normal distances), with
    every view's `(h, w, C)` features; for a labelled defect, its outline at the image's size (`None`:
    labelled without one, or a normal image)."""

    scored: ViewScores
    features: Sequence[np.ndarray]
    mask: np.ndarray | None = None
    # mirrored copies of a labelled defect (`fit --defect-flips`): their patches are learnt with it, and a fold
    # that holds the defect out holds them out too (they are part of it, not more defects)
    copies: Sequence[ScoredImage] = ()


def defect_rows(defect: ScoredImage, view: int, floor: float, top_percent: float) -> np.ndarray:
    """Indices (into the view's flattened grid) of the patches of `defect` to keep as defect patches."""
    distances = np.asarray(defect.scored.grids[view], np.float32)
    if defect.mask is not None:
        candidate = block_means(defect.mask.astype(np.float32), distances.shape).reshape(-1) > 0
    else:
        flat = distances.reshape(-1)
        k = max(1, int(round(flat.size * top_percent / 100.0)))
        candidate = np.zeros(flat.size, bool)
        candidate[np.argpartition(flat, flat.size - k)[flat.size - k:]] = True
    return np.flatnonzero(candidate & (distances.reshape(-1) >= floor))


def defect_bank(arrays: dict[str, np.ndarray], scorer: str, defects: Sequence[ScoredImage],
                floors: Sequence[float], top_percent: float) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """The defect arrays to add to a head's `arrays` (one bank per view that keeps any patch), and the patches
    kept per image (its copies' included) and view (kNN rows unit-norm, Mahalanobis rows as they are)."""
    banks: dict[str, np.ndarray] = {}
    kept = [[0] * len(floors) for _ in defects]
    for view, floor in enumerate(floors):
        rows = []
        for i, defect in enumerate(defects):
            for part in (defect, *defect.copies):
                index = defect_rows(part, view, floor, top_percent)
                kept[i][view] += len(index)
                features = np.asarray(part.features[view], np.float32)
                rows.append(features.reshape(-1, features.shape[-1])[index])
        patches = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        if len(patches):
            banks[bank_key(view)] = unit_rows(patches) if scorer == "knn" else patches
    return banks, kept


def prepared_bank(bank: np.ndarray, gaussian: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """A stored defect bank in the geometry its distances are taken in: as stored (kNN), or whitened by the
    view's Gaussian = (mean, whitener) (Mahalanobis)."""
    return bank if gaussian is None else whiten(bank, *gaussian)


def whiten(features, mean: np.ndarray, whitener: np.ndarray) -> np.ndarray:
    """Rows in the Mahalanobis geometry: `(x - mean) @ whitener` (Euclidean distances there are Mahalanobis)."""
    x = np.asarray(features, np.float32).reshape(-1, np.shape(features)[-1])
    return ((x - mean) @ whitener).astype(np.float32)


def defect_distance(features, bank: np.ndarray, gaussian: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Distance of each feature row to its nearest row of a `prepared_bank`: cosine (kNN), or Euclidean in the
    whitened space of `gaussian` = (mean, whitener) (Mahalanobis)."""
    if gaussian is None:
        return knn_distance(features, bank)
    x = whiten(features, *gaussian)
    squared = (bank * bank).sum(1)
    out = [np.sqrt(np.maximum((x[i : i + CHUNK] ** 2).sum(1, keepdims=True) - 2 * x[i : i + CHUNK] @ bank.T
                              + squared, 0)).min(axis=1) for i in range(0, len(x), CHUNK)]
    return np.concatenate(out).astype(np.float32)


def raise_scores(normal: np.ndarray, evidence: np.ndarray, weight: float) -> np.ndarray:
    """Patch scores raised by their defect evidence: `d_n · (1 + w · e)`."""
    return normal * (np.float32(1) + np.float32(weight) * np.asarray(evidence, np.float32))


def bank_evidence(features, bank: np.ndarray, gaussian: tuple[np.ndarray, np.ndarray] | None,
                  normal: np.ndarray) -> np.ndarray:
    """Each patch's bank evidence `max(0, 1 - d_d / d_n)` (flat; `normal`: its normal distances `d_n`, flat)."""
    nearest = defect_distance(features, bank, gaussian)
    return np.where(normal > 0, np.maximum(0, 1 - nearest / np.maximum(normal, 1e-12)), 0).astype(np.float32)


class DefectEvidence:
    """The defect evidence of a head's arrays, per view that has any: what `ScoringHead` raises its scores with
    and its image's defect evidence, and, on views already scored against the normal model (`ScoredImage`), what
    the weight choice and studies use without the normal search again — the same code, so the same scores."""

    def __init__(self, arrays: dict[str, np.ndarray], gaussians: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> None:
        self.gaussians = list(gaussians)
        self.banks = {view: prepared_bank(arrays[bank_key(view)], gaussian) for view, gaussian in enumerate(gaussians)
                      if bank_key(view) in arrays}
        self.linear = {view: (arrays[keys[0]], float(arrays[keys[1]][0])) for view in range(len(gaussians))
                       if (keys := linear_keys(view))[0] in arrays}
        self.image_banks = {view: prepared_bank(arrays[image_bank_key(view)], gaussian)
                            for view, gaussian in enumerate(gaussians) if image_bank_key(view) in arrays}
        # views whose image bank is their patch bank (the chosen patch evidence was the bank): the patch evidence
        # already holds what the image term pools, so one defect search per view serves both
        self.shared = {view for view in self.image_banks if view in self.banks
                       and np.array_equal(arrays[bank_key(view)], arrays[image_bank_key(view)])}

    def has(self, view: int) -> bool:
        return view in self.banks or view in self.linear

    def evidence(self, view: int, features, normal: np.ndarray) -> np.ndarray:
        """Each patch's defect evidence in [0, 1] (flat; `normal`: its normal distances, flat)."""
        if view in self.banks:
            return bank_evidence(features, self.banks[view], self.gaussians[view], normal)
        direction, bias = self.linear[view]
        return (1 / (1 + np.exp(-(unit_rows(features) @ direction + bias)))).astype(np.float32)

    def of(self, image: ScoredImage) -> list[np.ndarray | None]:
        """Per view of a scored image, its patches' evidence as a grid (None: nothing learnt for that view)."""
        return [self.evidence(view, features, grid.reshape(-1)).reshape(grid.shape) if self.has(view) else None
                for view, (grid, features) in enumerate(zip(image.scored.grids, image.features))]

    def image_evidence(self, image: ScoredImage, top_percent: float,
                       patch: Sequence[np.ndarray | None] = ()) -> float | None:
        """The image's defect evidence (module docstring); None without an image defect bank. `patch`: the image's
        patch evidence per view (`of`), reused on the views whose image bank is the patch bank."""
        if not self.image_banks:
            return None
        return float(np.mean([image_score(patch[view].reshape(-1) if view in self.shared and len(patch) > view
                                          else bank_evidence(image.features[view], bank, self.gaussians[view],
                                                             np.asarray(image.scored.grids[view]).reshape(-1)),
                                          top_percent)
                              for view, bank in self.image_banks.items()], dtype=np.float64))

    def rescored(self, image: ScoredImage, weight: float, top_percent: float) -> ViewScores:
        """What a head holding these arrays makes of an image scored by the normal model: its views raised at
        `weight`, and its image defect evidence."""
        patch = self.of(image)
        scored = self.raised(image, patch, weight)
        evidence = self.image_evidence(image, top_percent, patch)
        return scored if evidence is None else replace(scored, defect_evidence=evidence)

    @staticmethod
    def raised(image: ScoredImage, evidence: list[np.ndarray | None], weight: float) -> ViewScores:
        """The image's views raised at `weight` (the very object when that changes no patch)."""
        if weight == 0 or all(e is None or not (e > 0).any() for e in evidence):
            return image.scored
        return replace(image.scored, grids=[g if e is None else raise_scores(g, e, weight)
                                            for g, e in zip(image.scored.grids, evidence)])
