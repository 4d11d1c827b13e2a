"""The path an image takes through a detector: views → patch features → patch scores → fused grid → map.

An image is seen through one or more *views* (`Settings.views`): the whole image at a short side,
several short sides (multi-scale), or overlapping tiles (high resolution). Each view has its own scorer;
with several views the patch scores are standardised by their validation statistics and averaged on the
finest view's grid (`head.scores`), so one map and one image score come out whatever the views.

`Pipeline` owns the settings, the backbone and the fitting of the parts (scorers, foreground model, image
bank, LoRA heads); once they are fitted, everything after the backbone is the torch-free
`head.ScoringHead` (`self.head`), the same object the exported runtime scores with. The thresholds it is
judged against live in `head.calibration.Calibration`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from anomalyvfm.adaptation.heads import AnomalyHeads, head_scores
from anomalyvfm.adaptation.lora import load_lora
from anomalyvfm.data.images import ImageLike
from anomalyvfm.detector import model_dir
from anomalyvfm.detector.model_dir import StoredModel
from anomalyvfm.detector.out_of_fold import OOF_FOLDS, FeatureSpill, out_of_fold_scores
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import NotFittedError, UserInputError, failure
from anomalyvfm.features.backbone import Backbone, load_backbone, save_blocks
from anomalyvfm.features.extraction import FailedImage, ImageFeatures, extract_features
from anomalyvfm.features.foreground import SAMPLE_PATCHES, ForegroundModel
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.head.head import ScoringHead
from anomalyvfm.head.scores import ViewScores
from anomalyvfm.prediction import ImageViews, Prediction
from anomalyvfm.scoring.scorers import ImageBank, PatchScorer, make_scorer


@dataclass
class FitParts:
    """What a fit streams training images into: one scorer per view, the foreground model, the image bank.

    Unfinalised parts of disjoint image sets merge (`merge`), so a fit can run in shards on several workers.
    """

    scorers: list[PatchScorer]
    foreground: ForegroundModel | None
    image_bank: ImageBank
    images: int = 0

    def partial_fit(self, items: list[ImageFeatures]) -> None:
        """Add one image's features of every view (finest last)."""
        for scorer, item in zip(self.scorers, items):  # the image's index: bank-row sources, Mahalanobis folds
            scorer.partial_fit(item.features.reshape(-1, item.features.shape[-1]), self.images)
        if self.foreground is not None:
            self.foreground.partial_fit(items[-1].features)
        self.image_bank.partial_fit(items[-1].features)
        self.images += 1

    def merge(self, other: "FitParts") -> None:
        for mine, theirs in zip(self.scorers, other.scorers):
            mine.merge(theirs)
        if self.foreground is not None:
            self.foreground.merge(other.foreground)
        self.image_bank.merge(other.image_bank)
        self.images += other.images

    def finalize(self) -> None:
        for part in [*self.scorers, self.foreground, self.image_bank]:
            if part is not None:
                part.finalize()

    def arrays(self) -> dict[str, np.ndarray]:
        """The finalised parts' state as the scoring head's float32 arrays, keyed `<part>.<name>`."""
        parts = {f"view{i}": scorer.state_dict() for i, scorer in enumerate(self.scorers)}
        if self.foreground is not None:
            parts["foreground"] = self.foreground.state_dict()
        parts["global"] = self.image_bank.state_dict()
        return {f"{part}.{key}": value.detach().cpu().float().numpy() for part, state in parts.items()
                for key, value in state.items()}


Accumulator = Callable[["Pipeline", Sequence[ImageLike], bool], FitParts]  # how a fit streams its images


def accumulate(pipeline: "Pipeline", images: Sequence[ImageLike], progress: bool, total: int | None = None,
               shard: int = 0, spill: FeatureSpill | None = None) -> FitParts:
    """Stream `images` through `pipeline`'s backbone into fresh, unfinalised fitting parts (the local accumulator).

    This is the part of a fit that can run in shards on several workers, their parts merged after
    (`FitParts.merge`): `total` is the number of images of the whole fit, and `shard` offsets the random
    seeds so that shards draw independent samples. `spill` (local fits only) keeps the features of the
    images to be scored out of fold once the bank is final.
    """
    s, seed = pipeline.settings, pipeline.settings.seed + shard
    torch.manual_seed(seed)
    folds = OOF_FOLDS if spill is not None else 0
    parts = FitParts([make_scorer(s.scorer, s.coreset_ratio, s.max_bank_candidates, seed, s.memory_bank, folds)
                      for _ in s.views()],
                     None if s.foreground == "off" else ForegroundModel(SAMPLE_PATCHES // (total or len(images)), seed),
                     ImageBank(len(s.layers)))
    for items in pipeline.view_features(images, "features (train)" if progress else None):
        if isinstance(items, FailedImage):
            raise UserInputError(f"training image unreadable: {items.error}")
        if spill is not None:
            spill.add(parts.images, items)
        parts.partial_fit(items)
    return parts


class Pipeline:
    """Settings, runtime options, the backbone and the scoring head; every method runs one stage for a stream
    of images. `accumulator` is the engine of a fit (this process, or Ray workers: `distributed.fit`)."""

    def __init__(self, settings: Settings, runtime: Runtime, accumulator: Accumulator = accumulate) -> None:
        self.settings, self.runtime, self.accumulator = settings, runtime, accumulator
        self.backbone: Backbone | None = None
        self.backbone_source: str | None = None  # hub id or directory the backbone was loaded from
        self.adapter = None  # peft model wrapping `backbone.model` when adapted
        self.heads: AnomalyHeads | None = None
        self.head: ScoringHead | None = None  # everything after the backbone, built from the fitted parts
        self.out_of_fold: list[ViewScores] | None = None  # training images scored out of fold (fit time only)

    @classmethod
    def restore(cls, stored: StoredModel, runtime: Runtime, backbone: str | Path | None = None) -> "Pipeline":
        """A fitted pipeline from a read model directory: its head from the stored arrays, the backbone from the
        directory, else `backbone`, else the settings' reference (models saved by reference)."""
        pipeline = cls(stored.settings, runtime)
        adapter_dir = None
        if stored.settings.lora is not None:
            pipeline.heads = AnomalyHeads.load(stored.directory / model_dir.HEADS_FILE)
            adapter_dir = stored.directory / model_dir.ADAPTER_DIR
        pipeline.load_backbone(stored.backbone_dir or backbone, adapter_dir)
        pipeline.use_head_arrays(stored.head)
        return pipeline

    def configure(self, **changes) -> None:
        """Change settings (the `--auto` and image-evidence choices of a fit): the head, if fitted, follows."""
        self.settings = replace(self.settings, **changes)
        if self.head is not None:
            self.use_head_arrays(self.head.state_dict())

    def use_head_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Score with these fitted arrays from now on (fitted, loaded, or with what was learnt after: `--defects`)."""
        backend = "numpy" if self.runtime.device == "cpu" else "torch"  # kNN on the device the backbone runs on
        self.head = ScoringHead(self.settings.head_config(), arrays, backend, self.runtime.device)

    def use_runtime(self, **changes) -> None:
        """Change how this process runs the model (e.g. the score mode)."""
        self.runtime = replace(self.runtime, **changes)

    def adapt(self, adapter, heads: AnomalyHeads) -> None:
        """Use a trained LoRA adapter (wrapping `backbone.model`) and its anomaly heads from now on."""
        self.adapter, self.heads = adapter, heads

    def save_parts(self, folder: Path, store_backbone: bool) -> None:
        """Write what only torch can into a model directory being written (`model_dir.write`)."""
        if store_backbone:
            save_blocks(self.backbone_source, max(self.settings.layers), folder / model_dir.BACKBONE_DIR)
        if self.settings.lora is not None:
            self.adapter.save_pretrained(str(folder / model_dir.ADAPTER_DIR))
            self.heads.save(folder / model_dir.HEADS_FILE)

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

    def image_views(self, images: Sequence[ImageLike], progress: str | None) -> Iterator[ImageViews]:
        """`view_features` as the scoring head takes them: numpy, one `ImageViews` per image (failures too)."""
        for items in self.view_features(images, progress):
            yield (ImageViews(items.source, [], error=items.error) if isinstance(items, FailedImage) else
                   ImageViews(items[-1].source, [i.features.numpy() for i in items], items[-1].processed_shape,
                              items[-1].image_shape))

    def fit_scorers(self, images: Sequence[ImageLike], progress: bool, out_of_fold: bool = False) -> int:
        """Fit every view's scorer, the foreground model and the image bank on `images` (streamed by this
        pipeline's `accumulator`), then the scoring head from them; return how many images were used.

        With `out_of_fold`, the training images are also scored against the fitted state without what came
        from each of them (`detector.out_of_fold`), into `self.out_of_fold`, for the thresholds.
        """
        if out_of_fold and self.accumulator is not accumulate:  # shards cannot send their features back
            raise UserInputError("--threshold-rule budget needs out-of-fold scores of the training images, which "
                                 "--engine ray fits do not compute: fit with --engine local")
        spill = FeatureSpill(len(images)) if out_of_fold else None
        try:
            parts = (self.accumulator(self, images, progress) if spill is None
                     else accumulate(self, images, progress, spill=spill))
            parts.finalize()
            self.use_head_arrays(parts.arrays())
            self.out_of_fold = None if spill is None else out_of_fold_scores(self.head, parts.scorers, spill)
        finally:
            if spill is not None:
                spill.close()
        return parts.images

    def _fitted_head(self) -> ScoringHead:
        if self.head is None:
            raise NotFittedError()
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
