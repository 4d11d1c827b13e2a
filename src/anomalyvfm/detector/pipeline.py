"""The path an image takes through a detector: views → patch features → patch scores → fused grid → map.

An image is seen through one or more *views* (`Settings.views`): the whole image at a short side,
several short sides (multi-scale), or overlapping tiles (high resolution). Each view has its own scorer;
with several views the patch scores are standardised by their validation statistics and averaged on the
finest view's grid (`scoring.views`), so one map and one image score come out whatever the views.

`Pipeline` owns the settings, the backbone and the fitting of the parts (scorers, foreground model, image
bank, LoRA heads); once they are fitted, everything after the backbone is the torch-free
`head.ScoringHead` (`self.head`), the same object the exported runtime scores with. The thresholds it is
judged against live in `head.calibration.Calibration`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from anomalyvfm.adaptation.heads import AnomalyHeads, head_scores
from anomalyvfm.adaptation.lora import load_lora
from anomalyvfm.data.images import ImageLike
from anomalyvfm.detector.out_of_fold import OOF_FOLDS, FeatureSpill, out_of_fold_scores
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import NotFittedError, UserInputError, failure
from anomalyvfm.features.backbone import Backbone, load_backbone
from anomalyvfm.features.extraction import FailedImage, ImageFeatures, extract_features
from anomalyvfm.features.foreground import SAMPLE_PATCHES, ForegroundModel
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.head.head import HeadConfig, ScoringHead
from anomalyvfm.head.scores import ViewScores
from anomalyvfm.prediction import Prediction
from anomalyvfm.scoring.scorers import ImageBank, PatchScorer, make_scorer


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
        self.head: ScoringHead | None = None  # everything after the backbone, built from the fitted parts
        self.out_of_fold: list[ViewScores] | None = None  # training images scored out of fold (fit time only)

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
            raise NotFittedError("no backbone loaded: call load_backbone() first")
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

    def fit_scorers(self, images: Sequence[ImageLike], progress: bool, out_of_fold: bool = False) -> int:
        """Fit every view's scorer (and the foreground model) on `images`; return how many were used.

        With `out_of_fold`, the training images are also scored against the fitted state without what
        came from each of them (`detector.out_of_fold`), into `self.out_of_fold`, for the thresholds.
        """
        spill = FeatureSpill(len(images)) if out_of_fold else None
        try:
            fitted = self.accumulate(images, progress, spill=spill)
            self.finalize_scorers()
            if spill is not None:
                self.out_of_fold = out_of_fold_scores(self.head, self.scorers, spill)
        finally:
            if spill is not None:
                spill.close()
        return fitted

    def finalize_scorers(self) -> None:
        """Turn the accumulated (or merged) streaming states into fitted scorers, and those into the head."""
        for part in [*self.scorers, self.foreground_model, self.image_bank]:
            if part:
                part.finalize()
        self.build_head()

    def build_head(self) -> ScoringHead:
        """The scoring head of the fitted parts: their state as float32 arrays, keyed `<part>.<name>`."""
        parts = {f"view{i}": scorer.state_dict() for i, scorer in enumerate(self.scorers)}
        if self.foreground_model is not None:
            parts["foreground"] = self.foreground_model.state_dict()
        if self.image_bank is not None:
            parts["global"] = self.image_bank.state_dict()
        arrays = {f"{part}.{key}": value.detach().cpu().float().numpy() for part, state in parts.items()
                  for key, value in state.items()}
        s, device = self.settings, self.runtime.device
        config = HeadConfig(s.scorer, len(s.views()), len(s.layers), s.top_percent, s.sigma, s.image_evidence,
                            s.binarize)
        self.head = ScoringHead(config, arrays, "numpy" if device == "cpu" else "torch", device)
        return self.head

    def accumulate(self, images: Sequence[ImageLike], progress: bool, total: int | None = None, shard: int = 0,
                   spill: FeatureSpill | None = None) -> int:
        """Stream `images` into fresh, unfinalised scorers (and foreground model); return how many were used.

        This is the part of a fit that can run in shards on several workers, their parts merged after
        (`merge` of each scorer): `total` is the number of images of the whole fit, and `shard` offsets
        the random seeds so that shards draw independent samples. `spill` (local fits only) keeps the
        features of the images to be scored out of fold once the bank is final.
        """
        s, seed = self.settings, self.settings.seed + shard
        torch.manual_seed(seed)
        self.scorers = [make_scorer(s.scorer, s.coreset_ratio, s.max_bank_candidates, seed, s.memory_bank,
                                    OOF_FOLDS if spill is not None else 0)
                        for _ in s.views()]
        self.out_of_fold = None
        self.foreground_model = (None if s.foreground == "off"
                                 else ForegroundModel(SAMPLE_PATCHES // (total or len(images)), seed))
        self.image_bank = ImageBank(len(s.layers))
        fitted = 0
        for items in self.view_features(images, "features (train)" if progress else None):
            if isinstance(items, FailedImage):
                raise UserInputError(f"training image unreadable: {items.error}")
            for scorer, item in zip(self.scorers, items):
                scorer.partial_fit(item.features.reshape(-1, item.features.shape[-1]), fitted)
            if self.foreground_model:
                self.foreground_model.partial_fit(items[-1].features)
            self.image_bank.partial_fit(items[-1].features)
            if spill is not None:
                spill.add(fitted, items)
            fitted += 1
        return fitted

    def _fitted_head(self) -> ScoringHead:
        if self.head is None:
            raise NotFittedError("detector is not fitted: call fit() or AnomalyDetector.load()")
        return self.head

    def score_views(self, items: list[ImageFeatures]) -> ViewScores:
        """Patch scores of every view, the foreground mask and the head scores of one image's features."""
        ref = items[-1]
        head = head_scores(self.heads, ref.features) if self.heads is not None else None
        return self._fitted_head().score_views([item.features.numpy() for item in items], ref.source,
                                               ref.processed_shape, ref.image_shape, head)

    def predict(self, images: Sequence[ImageLike], calibration: Calibration, mode: str, decide: bool,
                progress: str | None) -> Iterator[Prediction]:
        """A `Prediction` per image, in order, in score `mode`; unreadable images yield one with `error` set."""
        head, thresholds = self._fitted_head(), calibration.thresholds(mode) if decide else None
        for items in self.view_features(images, progress):
            if isinstance(items, FailedImage):
                yield Prediction(source=items.source, error=items.error)
                continue
            try:
                yield head.judge(self.score_views(items), calibration, mode, thresholds)
            except Exception as exc:  # e.g. out of memory for one huge map: that image fails, the run goes on
                yield Prediction(source=items[-1].source, error=failure(items[-1].source, exc))
