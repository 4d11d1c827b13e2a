"""`ScoringHead`: each view's patch features → patch scores → fused grid → map → verdict and mask.

The fitted state is a flat dict of float32 arrays (`state_dict`), keyed `<part>.<name>`: `view<i>.bank`
(kNN) or `view<i>.mean` / `view<i>.whitener` (Mahalanobis) per view, `foreground.mean` /
`foreground.component` / `foreground.threshold` when the model has a foreground model, and
`global.embeddings` (the training images' global embeddings, for image evidence), and `defects.view<i>.*` /
`defects.image.view<i>.bank` when the model learnt from labelled defects (`head.defects`). The torch fit produces
it (`detector.pipeline`), the model directory and the exported bundle store it; the head reads nothing else.

Out-of-fold scores of training images (fit time, `detector.out_of_fold`) go through the same
`score_views` with a `HeldOut`: what of the fitted state came from that image (its kNN bank rows, its
global embedding) is left out, or, for Mahalanobis, the Gaussian fitted without its fold is used.

The calibration (thresholds and validation statistics) is passed in, not held: it is fitted *through* the
head (`detector.calibration.calibrate` scores validation images with it), and owned by the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from anomalyvfm.errors import NotFittedError
from anomalyvfm.features.masks import foreground_mask
from anomalyvfm.head.calibration import Calibration, Thresholds
from anomalyvfm.head.defects import DEFAULT_WEIGHT, DefectEvidence, ScoredImage
from anomalyvfm.head.scores import HeadLogits, RawScores, ViewScores, combine
from anomalyvfm.head.search import BankSearch, make_search
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.maps.binarize import model_mask
from anomalyvfm.prediction import Prediction
from anomalyvfm.scoring.distances import fuse_views, knn_distance, mahalanobis_distance, suppress_background
from anomalyvfm.scoring.image_evidence import fuse_image_evidence, global_distance, image_embedding
from anomalyvfm.scoring.pooling import image_score


@dataclass(frozen=True)
class HeadConfig:
    """The settings the head applies (a subset of `Settings`, so the runtime needs no torch to build one)."""

    scorer: str  # "knn" | "mahalanobis"
    views: int
    blocks: int  # backbone blocks concatenated in each feature (for the global embedding)
    top_percent: float = 1.0
    sigma: float = 4.0
    image_evidence: str = "patch"
    binarize: str = "global"
    outline_only_flagged: bool = False
    defect_weight: float = DEFAULT_WEIGHT  # how far a patch nearer a known defect than normal is raised (`head.defects`)
    # the reference view's geometry: a mask's minimum region is one backbone patch (`maps.binarize.patch_side`)
    image_size: int = 448
    scales: tuple[int, ...] = ()
    tile_size: int = 0
    tile_scale: float = 1.0

    def required_arrays(self) -> list[str]:
        """The fitted arrays a head of this config reads (foreground and global embeddings are optional
        unless the image evidence needs them: models from before those parts score without them)."""
        names = ("bank",) if self.scorer == "knn" else ("mean", "whitener")
        required = [f"view{i}.{name}" for i in range(self.views) for name in names]
        return required + (["global.embeddings"] if self.image_evidence != "patch" else [])


@dataclass(frozen=True)
class HeldOut:
    """What to leave out when scoring one training image out of fold (fit time only).

    `bank_rows`: per view, the kNN bank rows that came from the image; `gaussians`: per view, the
    Mahalanobis (mean, whitener) fitted without the image's fold; `global_row`: the image's own row of
    the global embeddings (every training image has one, so in-sample its global distance is ~0).
    """

    bank_rows: tuple[np.ndarray, ...] = ()
    gaussians: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    global_row: int | None = None


class ScoringHead:
    """Everything after the backbone, for one fitted model; see the module docstring.

    `search` picks the kNN backend (`head.search`): "numpy" (default), "torch" (with `device`, e.g. a GPU)
    or "openvino"; all give the same distances.
    """

    def __init__(self, config: HeadConfig, arrays: Mapping[str, np.ndarray], search: str = "numpy",
                 device: str = "cpu") -> None:
        self.config = config
        self._arrays = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in arrays.items()}
        missing = [key for key in config.required_arrays() if key not in self._arrays]
        if missing:
            raise NotFittedError(f"the fitted state has no {', '.join(missing)}")
        self._search: list[BankSearch] = ([make_search(self._arrays[f"view{i}.bank"], search, device)
                                           for i in range(config.views)] if config.scorer == "knn" else [])
        self._defects = DefectEvidence(self._arrays, [self.gaussian(view) for view in range(config.views)])

    def state_dict(self) -> dict[str, np.ndarray]:
        """The fitted arrays (a copy of the dict; the arrays themselves are shared and not to be written)."""
        return dict(self._arrays)

    @property
    def has_foreground(self) -> bool:
        return "foreground.mean" in self._arrays

    @property
    def separability(self) -> float:
        """How clearly the foreground direction splits patches in two (Otsu's ratio; `features.foreground`)."""
        return float(self._arrays["foreground.separability"][0])

    @property
    def has_global(self) -> bool:
        return "global.embeddings" in self._arrays

    @property
    def image_terms(self) -> tuple[str, ...]:
        """The image-level evidence terms this head computes beside the patch score (`scoring.image_evidence`)."""
        return (("global",) if self.has_global else ()) + (("defects",) if self._defects.image_banks else ())

    @property
    def image_evidence(self) -> str:
        """The evidence the image score is made of: the config's, plus "defects" when the head holds an image
        defect bank (learnt at fit time, so no setting names it)."""
        return self.config.image_evidence + ("+defects" if self._defects.image_banks else "")

    # -- per image ------------------------------------------------------------------------------------
    def score_views(self, features: Sequence[np.ndarray], source: str, processed_shape: tuple[int, int],
                    image_shape: tuple[int, int], head: HeadLogits | None = None,
                    held_out: HeldOut | None = None) -> ViewScores:
        """Patch scores of every view's `(h, w, C)` features (finest last), the foreground mask and the global
        distance of the reference (last) view, then what learnt defects make of them (`head.defects`); `head`
        carries a LoRA head's logits through; `held_out` scores a training image out of fold."""
        features = [np.asarray(f, np.float32) for f in features]
        grids = [self.normal_scores(view, f, held_out).reshape(f.shape[:2]) for view, f in enumerate(features)]
        ref, a = features[-1], self._arrays
        mask = (foreground_mask(ref, a["foreground.mean"], a["foreground.component"], float(a["foreground.threshold"][0]))
                if self.has_foreground else None)
        distance = None
        if self.has_global:
            embeddings = a["global.embeddings"]
            if held_out is not None and held_out.global_row is not None and len(embeddings) > 1:
                embeddings = np.delete(embeddings, held_out.global_row, axis=0)
            distance = global_distance(image_embedding(ref, self.config.blocks), embeddings)
        normal = ViewScores(source, grids, mask, tuple(processed_shape), tuple(image_shape), head, distance)
        return self._defects.rescored(ScoredImage(normal, features), self.config.defect_weight, self.config.top_percent)

    def normal_scores(self, view: int, features: np.ndarray, held_out: HeldOut | None = None) -> np.ndarray:
        """Flat distances of one view's features to normal, by that view's scorer (without what `held_out` names)."""
        if self._search:
            if held_out is not None and held_out.bank_rows:
                return knn_distance(features, self._arrays[f"view{view}.bank"], held_out.bank_rows[view])
            return self._search[view](features)
        if held_out is not None and held_out.gaussians:
            return mahalanobis_distance(features, *held_out.gaussians[view])
        return mahalanobis_distance(features, *self.gaussian(view))

    def gaussian(self, view: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A Mahalanobis view's (mean, whitener); None for kNN."""
        if self.config.scorer == "knn":
            return None
        return self._arrays[f"view{view}.mean"], self._arrays[f"view{view}.whitener"]

    def fuse(self, scored: ViewScores, calibration: Calibration, evidence: str | None = None) -> RawScores:
        """Views fused into one distance grid (standardised by `calibration`'s view statistics, background
        capped when its foreground decision says so); the image score from `evidence` (default the config's)."""
        grid = scored.grids[-1]
        if len(scored.grids) > 1:
            grid = fuse_views(scored.grids, calibration.view_stats)
        if calibration.suppress_background and scored.foreground is not None:
            grid = suppress_background(grid, scored.foreground)
        patch = image_score(grid, self.config.top_percent)
        score = fuse_image_evidence(patch, {"global": scored.global_distance, "defects": scored.defect_evidence},
                                    calibration.image_stats, evidence or self.image_evidence)
        raw = RawScores(grid, score)
        if scored.head is not None:
            raw.head, raw.head_image = scored.head
        return raw

    def predict(self, features: Sequence[np.ndarray], source: str, processed_shape: tuple[int, int],
                image_shape: tuple[int, int], calibration: Calibration, mode: str = "distance",
                thresholds: Thresholds | None = None, head: HeadLogits | None = None) -> Prediction:
        """The `Prediction` of one image in score `mode`; with `thresholds`, also its verdict and defect mask."""
        scored = self.score_views(features, source, processed_shape, image_shape, head)
        return self.judge(scored, calibration, mode, thresholds)

    def judge(self, scored: ViewScores, calibration: Calibration, mode: str = "distance",
              thresholds: Thresholds | None = None) -> Prediction:
        """`predict` from an image's already scored views."""
        grid, score = combine(self.fuse(scored, calibration), mode, calibration.head_stats)
        amap = anomaly_map(grid, scored.processed_shape, scored.image_shape, self.config.sigma)
        pred = Prediction(source=scored.source, score=score, anomaly_map=amap)
        if thresholds is not None:
            pred.is_anomalous = bool(score > thresholds.image_threshold)
            pred.mask = model_mask(amap, self.config, thresholds, pred.is_anomalous)
        return pred
