"""The path an image takes through a detector: views → patch features → patch scores → fused grid → map.

An image is seen through one or more *views* (`Settings.views`): the whole image at a short side,
several short sides (multi-scale), or overlapping tiles (high resolution). Each view has its own scorer;
with several views the patch scores are standardised by their validation statistics and averaged on the
finest view's grid (`scoring.views`), so one map and one image score come out whatever the views.

`Pipeline` owns the settings and the fitted parts (backbone, scorers, foreground model, heads); the
thresholds it is judged against live in `calibration.Calibration`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from anomalyvfm.adaptation.heads import AnomalyHeads
from anomalyvfm.adaptation.lora import load_lora
from anomalyvfm.data.images import ImageLike
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import UserInputError, failure
from anomalyvfm.features.backbone import Backbone, load_backbone
from anomalyvfm.features.extraction import FailedImage, ImageFeatures, extract_features
from anomalyvfm.features.foreground import SAMPLE_PATCHES, ForegroundModel
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.maps.binarize import model_mask
from anomalyvfm.prediction import Prediction
from anomalyvfm.scoring.image_evidence import fuse_image_evidence
from anomalyvfm.scoring.score_modes import RawScores, combine, head_scores, raw_scores
from anomalyvfm.scoring.scorers import ImageBank, PatchScorer, make_scorer
from anomalyvfm.scoring.views import ViewScores, fuse


class Pipeline:
    """Settings, runtime options and the fitted parts; every method runs one stage for a stream of images."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings, self.runtime = settings, runtime
        self.backbone: Backbone | None = None
        self.backbone_source: str | None = None  # hub id or directory the backbone was loaded from
        self.adapter = None  # peft model wrapping `backbone.model` when adapted
        self.scorers: list[PatchScorer] = []  # one per view
        self.image_bank: ImageBank | None = None  # training images' global embeddings (reference view)
        self.foreground_model: ForegroundModel | None = None
        self.heads: AnomalyHeads | None = None

    def load_backbone(self, source: str | Path | None = None, adapter_dir: Path | None = None) -> Backbone:
        """Load the backbone (from `source`, default the settings' reference) and, if given, its LoRA adapter.

        Unset `layers` become the backbone's defaults here, so the settings always say which blocks were used.
        """
        s, r = self.settings, self.runtime
        self.backbone_source = str(source or s.backbone)
        self.backbone = load_backbone(self.backbone_source, s.layers, r.device, r.precision)
        self.settings = replace(s, layers=self.backbone.layers)
        self.adapter = load_lora(self.backbone, adapter_dir) if adapter_dir is not None else None
        return self.backbone

    def features(self, images: Sequence[ImageLike], progress: str | None = None,
                 view: int = -1) -> Iterator[ImageFeatures | FailedImage]:
        """Patch features of each image at one view (default: the reference view), in order."""
        if self.backbone is None:
            raise RuntimeError("no backbone loaded: call load_backbone() first")
        image_size, tiling = self.settings.views()[view]
        return extract_features(self.backbone, images, image_size, self.runtime.batch_size, progress, tiling,
                                self.runtime.max_aspect_ratio)

    def view_features(self, images: Sequence[ImageLike],
                      progress: str | None) -> Iterator[list[ImageFeatures] | FailedImage]:
        """Every view's features of each image, in lockstep: one batch per view in memory at a time."""
        last = len(self.settings.views()) - 1
        streams = [self.features(images, progress if i == last else None, i) for i in range(last + 1)]
        for items in zip(*streams):
            failed = [item for item in items if isinstance(item, FailedImage)]  # a view can fail alone (out of memory)
            yield failed[0] if failed else list(items)

    def fit_scorers(self, images: Sequence[ImageLike], progress: bool) -> int:
        """Fit every view's scorer (and the foreground model) on `images`; return how many were used."""
        fitted = self.accumulate(images, progress)
        self.finalize_scorers()
        return fitted

    def finalize_scorers(self) -> None:
        """Turn the accumulated (or merged) streaming states into fitted scorers."""
        for part in [*self.scorers, self.foreground_model, self.image_bank]:
            if part:
                part.finalize()

    def accumulate(self, images: Sequence[ImageLike], progress: bool, total: int | None = None, shard: int = 0) -> int:
        """Stream `images` into fresh, unfinalised scorers (and foreground model); return how many were used.

        This is the part of a fit that can run in shards on several workers, their parts merged after
        (`merge` of each scorer): `total` is the number of images of the whole fit, and `shard` offsets
        the random seeds so that shards draw independent samples.
        """
        s, seed = self.settings, self.settings.seed + shard
        torch.manual_seed(seed)
        self.scorers = [make_scorer(s.scorer, s.coreset_ratio, s.max_bank_candidates, seed, s.memory_bank)
                        for _ in s.views()]
        self.foreground_model = (None if s.foreground == "off"
                                 else ForegroundModel(SAMPLE_PATCHES // (total or len(images)), seed))
        self.image_bank = ImageBank(len(s.layers))
        fitted = 0
        for items in self.view_features(images, "features (train)" if progress else None):
            if isinstance(items, FailedImage):
                raise UserInputError(f"training image unreadable: {items.error}")
            for scorer, item in zip(self.scorers, items):
                scorer.partial_fit(item.features.reshape(-1, item.features.shape[-1]))
            if self.foreground_model:
                self.foreground_model.partial_fit(items[-1].features)
            self.image_bank.partial_fit(items[-1].features)
            fitted += 1
        return fitted

    def score_views(self, items: list[ImageFeatures]) -> ViewScores:
        """Patch scores of every view, the foreground mask and the head scores of one image's features."""
        if not self.scorers:
            raise RuntimeError("detector is not fitted: call fit() or AnomalyDetector.load()")
        grids = [scorer.score(item.features.reshape(-1, item.features.shape[-1])).reshape(item.features.shape[:2])
                 for scorer, item in zip(self.scorers, items)]
        ref = items[-1]
        mask = self.foreground_model.mask(ref.features) if self.foreground_model else None
        head = head_scores(self.heads, ref.features) if self.heads is not None else None
        distance = self.image_bank.score(ref.features) if self.image_bank is not None else None
        return ViewScores(ref.source, grids, mask, ref.processed_shape, ref.image_shape, head, distance)

    def raw(self, scored: ViewScores, calibration, evidence: str | None = None) -> RawScores:
        """Views fused into one distance grid (with `calibration`'s view statistics), plus the head scores;
        the image score from `evidence` (default the settings' `image_evidence`)."""
        grid = fuse(scored, calibration.view_stats, calibration.suppress_background)
        raw = raw_scores(grid, scored.head, self.settings.top_percent)
        raw.distance_image = fuse_image_evidence(raw.distance_image, scored.global_distance, calibration.image_stats,
                                                 evidence or self.settings.image_evidence)
        return raw

    def predict(self, images: Sequence[ImageLike], calibration, mode: str, decide: bool,
                progress: str | None) -> Iterator[Prediction]:
        """A `Prediction` per image, in order, in score `mode`; unreadable images yield one with `error` set."""
        thresholds = calibration.thresholds(mode)
        for items in self.view_features(images, progress):
            if isinstance(items, FailedImage):
                yield Prediction(source=items.source, error=items.error)
                continue
            try:
                yield self._predict_one(items, calibration, mode, thresholds if decide else None)
            except Exception as exc:  # e.g. out of memory for one huge map: that image fails, the run goes on
                yield Prediction(source=items[-1].source, error=failure(items[-1].source, exc))

    def _predict_one(self, items: list[ImageFeatures], calibration, mode: str, thresholds) -> Prediction:
        scored = self.score_views(items)
        grid, score = combine(self.raw(scored, calibration), mode, calibration.head_stats)
        amap = anomaly_map(grid, scored.processed_shape, scored.image_shape, self.settings.sigma)
        pred = Prediction(source=scored.source, score=score, anomaly_map=amap)
        if thresholds is not None:
            pred.is_anomalous = bool(pred.score > thresholds.image_threshold)
            pred.mask = model_mask(amap, self.settings, thresholds, pred.is_anomalous)
        return pred
