"""`AnomalyDetector`: the fit/predict surface that ties backbone, features, scorer and maps together.

State lives in one place: a `DetectorConfig` (everything needed to rebuild the detector, saved as
`config.json`) plus the fitted scorers' tensors (saved as `scorer.safetensors`). The backbone is not
copied into the model directory; `config.backbone` names the hub id or local directory it came from.
A LoRA-adapted detector (`config.lora` set) also saves its peft adapter (`adapter/`) and anomaly heads
(`heads.safetensors`); thresholds are kept for every score mode, so `load(..., score=MODE)` switches.

An image is seen through one or more *views* (`DetectorConfig.views`): the whole image at a short side,
several short sides (multi-scale), or overlapping tiles (high resolution). Each view has its own scorer;
with several views the patch scores are standardised by their validation statistics and averaged on
the finest view's grid (`fusion.py`), so one map and one image score come out whatever the views.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anomalyvfm.adaptation.lora import load_lora
from anomalyvfm.features.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from anomalyvfm.data.datasets import hold_out
from anomalyvfm.data.images import ImageLike
from anomalyvfm.errors import UserInputError
from anomalyvfm.features.extraction import FailedImage, ImageFeatures, Tiling, extract_features
from anomalyvfm.features.foreground import FOREGROUND_MODES, SAMPLE_PATCHES, ForegroundModel, looks_like_object, mask_stats
from anomalyvfm.scoring.views import Scored, fuse, view_statistics
from anomalyvfm.adaptation.heads import AnomalyHeads
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.maps.thresholds import sigma_threshold
from anomalyvfm.prediction import Prediction
from anomalyvfm.scoring.moments import RunningMoments
from anomalyvfm.scoring.score_modes import SCORE_MODES, RawScores, combine, fusion_stats, raw_scores
from anomalyvfm.scoring.scorers import SCORERS, PatchScorer, make_scorer
from anomalyvfm.adaptation.training import AdaptationConfig, train_adapter

CONFIG_FILE = "config.json"
SCORER_FILE = "scorer.safetensors"
ADAPTER_DIR = "adapter"
HEADS_FILE = "heads.safetensors"
PATCH = 14  # every DINOv2 has 14-px patches; tile sizes are checked against it before loading the model


@dataclass
class DetectorConfig:
    """Every setting of a detector. Thresholds are filled by `fit` from validation (good) images only."""

    backbone: str = DEFAULT_BACKBONE
    layers: tuple[int, ...] | None = None  # None: backbone.default_layers(depth), filled in at load
    image_size: int = 448
    scorer: str = "knn"  # beat Mahalanobis on validation + synthetic anomalies (README)
    coreset_ratio: float = 0.1
    max_bank_candidates: int = 100_000
    top_percent: float = 1.0
    sigma: float = 4.0
    threshold_sigma: float = 3.0
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    precision: str = "fp32"
    tile_size: int = 0  # > 0: score overlapping tiles of this many backbone px (features.Tiling)
    tile_overlap: int = 56
    tile_scale: float = 1.0  # tiles are cut from the image resized by this factor
    scales: tuple[int, ...] = ()  # several short sides, fused into one map; () means (image_size,)
    foreground: str = "off"  # off | on | auto (foreground.py)
    auto: bool = False  # choose image size, tiling, layers and scorer on validation data (autoconfig.py)
    pixel_threshold: float | None = None
    image_threshold: float | None = None
    validation_stats: dict = field(default_factory=dict)
    train_images: int = 0
    score: str = "distance"  # distance | head | fusion (see score_modes); head and fusion need lora
    lora: dict | None = None  # AdaptationConfig fields; None: frozen backbone
    lora_record: dict = field(default_factory=dict)  # what training did: steps, best step, seconds
    fusion_stats: dict = field(default_factory=dict)
    mode_thresholds: dict = field(default_factory=dict)  # score mode -> thresholds and validation stats
    view_stats: list = field(default_factory=list)  # per view: validation patch-score mean and std
    foreground_stats: dict = field(default_factory=dict)  # validation mask coverage and whether it is applied
    auto_choice: dict = field(default_factory=dict)  # what --auto chose and the validation figures behind it
    version: str = ""

    def validate(self) -> None:
        if self.scorer not in SCORERS:
            raise UserInputError(f"unknown scorer '{self.scorer}' (choose from {', '.join(SCORERS)})")
        if self.image_size < 14:
            raise UserInputError(f"--image-size must be at least 14, got {self.image_size}")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 < self.top_percent <= 100:
            raise UserInputError(f"top_percent must be in (0, 100], got {self.top_percent}")
        if self.score not in SCORE_MODES:
            raise UserInputError(f"unknown score mode '{self.score}' (choose from {', '.join(SCORE_MODES)})")
        if self.lora is None and self.score != "distance":
            raise UserInputError(f"--score {self.score} needs LoRA heads: fit with --lora")
        if self.lora is not None:
            AdaptationConfig(**self.lora).validate()
        if self.tile_size and (self.tile_size % PATCH or self.tile_overlap % PATCH
                               or not 0 <= self.tile_overlap < self.tile_size):
            raise UserInputError(f"--tile-size and --tile-overlap must be multiples of {PATCH} with overlap < size, "
                                 f"got {self.tile_size} and {self.tile_overlap}")
        if self.tile_scale <= 0:
            raise UserInputError(f"--tile-scale must be positive, got {self.tile_scale}")
        if self.scales and (self.tile_size or min(self.scales) < PATCH):
            raise UserInputError(f"--scales needs sizes >= {PATCH} and no --tile-size, got {list(self.scales)}")
        if self.foreground not in FOREGROUND_MODES:
            raise UserInputError(f"unknown --foreground '{self.foreground}' (choose from {', '.join(FOREGROUND_MODES)})")

    def summary(self) -> str:
        """The settings that define what is computed, in one line (fit output, benchmark tables)."""
        if self.tile_size:
            view = f"tiles {self.tile_size}/{self.tile_overlap} px @ x{self.tile_scale:g}"
        else:
            view = "+".join(str(size) for size in sorted(self.scales or (self.image_size,))) + " px"
        layers = ",".join(map(str, self.layers)) if self.layers else "default"
        foreground = self.foreground
        if self.foreground_stats:
            foreground += f" ({'applied' if self.foreground_stats['active'] else 'not applied'})"
        return f"{view}, layers {layers}, {self.scorer}, foreground {foreground}" + (", auto" if self.auto else "")

    def views(self) -> list[tuple[int, Tiling | None]]:
        """(image_size, tiling) of each view, coarsest first; the last one is the reference grid."""
        if self.tile_size:
            return [(self.image_size, Tiling(self.tile_size, self.tile_overlap, self.tile_scale))]
        return [(size, None) for size in sorted(self.scales or (self.image_size,))]


class AnomalyDetector:
    """Fit on good images, then score new ones: `AnomalyDetector(backbone=DIR).fit(paths).predict(paths)`."""

    def __init__(self, config: DetectorConfig | None = None, **settings) -> None:
        self.config = config or DetectorConfig()
        for key, value in settings.items():
            if not hasattr(self.config, key):
                raise TypeError(f"unknown setting '{key}'")
            setattr(self.config, key, value)
        self.config.validate()
        self._backbone: Backbone | None = None
        self.scorers: list[PatchScorer] = []  # one per view
        self.foreground_model: ForegroundModel | None = None
        self.heads: AnomalyHeads | None = None
        self._adapter = None  # peft model of the adapted backbone
        self._adapter_dir: Path | None = None  # saved adapter, injected when the backbone loads

    # -- components -----------------------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        """The backbone, loaded on first use (loading takes seconds; `load` then `predict` pays once)."""
        if self._backbone is None:
            c = self.config
            self._backbone = load_backbone(c.backbone, c.layers, c.device, c.precision)
            self.config.layers = self._backbone.layers
            if self._adapter_dir is not None:
                self._adapter = load_lora(self._backbone, self._adapter_dir)
        return self._backbone

    def features(
        self, images: Sequence[ImageLike], progress: str | None = None, view: int = -1
    ) -> Iterator[ImageFeatures | FailedImage]:
        """Patch features of each image at one view (default: the reference view), in order."""
        image_size, tiling = self.config.views()[view]
        return extract_features(self.backbone, images, image_size, self.config.batch_size, progress, tiling)

    def _view_features(self, images: Sequence[ImageLike], progress: str | None) -> Iterator[list[ImageFeatures] | FailedImage]:
        """Every view's features of each image, in lockstep: one batch per view in memory at a time."""
        last = len(self.config.views()) - 1
        streams = [self.features(images, progress if i == last else None, i) for i in range(last + 1)]
        for items in zip(*streams):
            yield items[0] if isinstance(items[0], FailedImage) else list(items)

    def _score_views(self, items: list[ImageFeatures]) -> Scored:
        if not self.scorers:
            raise RuntimeError("detector is not fitted: call fit() or AnomalyDetector.load()")
        grids = [scorer.score(item.features.reshape(-1, item.features.shape[-1])).reshape(item.features.shape[:2])
                 for scorer, item in zip(self.scorers, items)]
        ref = items[-1]
        mask = self.foreground_model.mask(ref.features) if self.foreground_model else None
        return Scored(ref.source, grids, mask, ref.processed_shape, ref.image_shape, ref.features)

    def _raw(self, scored: Scored) -> RawScores:
        """Views fused into one distance grid, plus head logits on the reference view when adapted."""
        grid = fuse(scored, self.config.view_stats, bool(self.config.foreground_stats.get("active")))
        return raw_scores(grid, self.heads, scored.features, self.config.top_percent)

    def use_score(self, mode: str) -> None:
        """Switch a fitted detector to score `mode`, with that mode's thresholds (fitted on validation)."""
        if mode not in self.config.mode_thresholds:
            have = ", ".join(self.config.mode_thresholds) or "none"
            raise UserInputError(f"this model has no '{mode}' scores (it has: {have}); head and fusion need fit --lora")
        self.config.score = mode
        for key, value in self.config.mode_thresholds[mode].items():
            setattr(self.config, key, value)

    # -- fit / predict --------------------------------------------------------------------------
    def fit(
        self, images: Sequence[ImageLike], validation_images: Sequence[ImageLike] | None = None, progress: bool = True
    ) -> "AnomalyDetector":
        """Learn normal patch statistics from `images`, then thresholds from `validation_images`.

        Without validation images a seeded 10 % of `images` is held out, so thresholds never come from
        the same images the statistics were fitted on.
        """
        images = list(images)
        if validation_images is None:
            train, validation = hold_out(len(images), self.config.seed)
            images, validation_images = [images[i] for i in train], [images[i] for i in validation]
        if not images:
            raise UserInputError("no training images given")
        if self.config.auto:
            from anomalyvfm.detector.auto import choose_settings

            self.config.auto_choice = choose_settings(self.config, images, list(validation_images), progress)
            for key, value in self.config.auto_choice["chosen"].items():
                setattr(self.config, key, tuple(value) if isinstance(value, list) else value)
            self.config.validate()
            self._backbone = None  # reload with the chosen layers
        if self.config.lora is not None:
            self._adapt(images, list(validation_images), progress)
        torch.manual_seed(self.config.seed)
        c = self.config
        self.scorers = [make_scorer(c.scorer, c.coreset_ratio, c.max_bank_candidates, c.seed) for _ in c.views()]
        self.foreground_model = None if c.foreground == "off" else ForegroundModel(SAMPLE_PATCHES // len(images), c.seed)
        fitted = 0
        for items in self._view_features(images, "features (train)" if progress else None):
            if isinstance(items, FailedImage):
                raise UserInputError(f"training image unreadable: {items.error}")
            for scorer, item in zip(self.scorers, items):
                scorer.partial_fit(item.features.reshape(-1, item.features.shape[-1]))
            if self.foreground_model:
                self.foreground_model.partial_fit(items[-1].features)
            fitted += 1
        for part in [*self.scorers, self.foreground_model]:
            if part:
                part.finalize()
        self.config.train_images = fitted
        self._fit_thresholds(list(validation_images), progress)
        from anomalyvfm import __version__

        self.config.version = __version__
        return self

    def _adapt(self, images: list[ImageLike], validation_images: list[ImageLike], progress: bool) -> None:
        """Train LoRA adapters and heads on synthetic anomalies, starting from the pretrained backbone."""
        self._backbone, self._adapter_dir = None, None
        settings = AdaptationConfig(**self.config.lora)
        self._adapter, self.heads, self.config.lora_record = train_adapter(
            self.backbone, images, validation_images, settings, self.config.image_size, self.config.seed, progress)

    def _fit_thresholds(self, images: Sequence[ImageLike], progress: bool) -> None:
        """Thresholds of every available score mode from one pass over validation/good images."""
        if not images:
            raise UserInputError("no validation images: thresholds need defect-free validation images")
        scored = []
        for items in self._view_features(images, "thresholds (validation)" if progress else None):
            if isinstance(items, FailedImage):
                raise UserInputError(f"validation image unreadable: {items.error}")
            scored.append(self._score_views(items))
        self._calibrate(scored)
        outputs = [(self._raw(item), item.processed_shape, item.image_shape) for item in scored]
        self.config.fusion_stats = fusion_stats([raw for raw, *_ in outputs]) if self.heads is not None else {}
        modes = SCORE_MODES if self.heads is not None else ("distance",)
        self.config.mode_thresholds = {mode: self._mode_thresholds(outputs, mode) for mode in modes}
        self.use_score(self.config.score)

    def _mode_thresholds(self, outputs: list[tuple[RawScores, tuple, tuple]], mode: str) -> dict:
        """Mean + `threshold_sigma` std of one mode's map pixels and image scores over the validation outputs."""
        pixels, scores = RunningMoments(), RunningMoments()
        for raw, processed_shape, image_shape in outputs:
            grid, score = combine(raw, mode, self.config.fusion_stats)
            pixels.update(anomaly_map(grid, processed_shape, image_shape, self.config.sigma))
            scores.update(np.array([score]))
        stats = {"images": scores.n, "image_score_mean": scores.mean, "image_score_std": scores.std,
                 "pixel_score_mean": pixels.mean, "pixel_score_std": pixels.std}
        return {"pixel_threshold": sigma_threshold(pixels, self.config.threshold_sigma),
                "image_threshold": sigma_threshold(scores, self.config.threshold_sigma), "validation_stats": stats}

    def _calibrate(self, scored: list[Scored]) -> None:
        """Per-view score statistics (to fuse views) and the foreground decision, from validation images."""
        self.config.view_stats = view_statistics(scored)
        self.config.foreground_stats = {}
        if self.foreground_model:
            stats = mask_stats(self.foreground_model, [item.foreground for item in scored])
            active = self.config.foreground == "on" or looks_like_object(stats)
            self.config.foreground_stats = {**stats, "active": active}

    def _predict_one(self, scored: Scored, decide: bool) -> Prediction:
        scores, score = combine(self._raw(scored), self.config.score, self.config.fusion_stats)
        amap = anomaly_map(scores, scored.processed_shape, scored.image_shape, self.config.sigma)
        pred = Prediction(source=scored.source, score=score, anomaly_map=amap)
        if decide:
            pred.is_anomalous = bool(pred.score > self.config.image_threshold)
            pred.mask = amap > self.config.pixel_threshold
        return pred

    def predict_iter(
        self, images: Sequence[ImageLike], progress: str | None = "predict", decide: bool = True
    ) -> Iterator[Prediction]:
        """Yield a `Prediction` per image, in order; unreadable images yield one with `error` set."""
        for items in self._view_features(images, progress):
            if isinstance(items, FailedImage):
                yield Prediction(source=items.source, error=items.error)
            else:
                yield self._predict_one(self._score_views(items), decide)

    def predict(self, images: Sequence[ImageLike], progress: bool = True) -> list[Prediction]:
        """Score all images; see `predict_iter` to stream results for large batches."""
        return list(self.predict_iter(images, "predict" if progress else None))

    # -- persistence ----------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        """All fitted tensors, flat: view 0's scorer unprefixed (as in single-view models), then
        `view<i>.<key>` for further views and `foreground.<key>` for the foreground model."""
        parts = {f"view{i}" if i else "": scorer.state_dict() for i, scorer in enumerate(self.scorers)}
        if self.foreground_model:
            parts["foreground"] = self.foreground_model.state_dict()
        return {f"{part}.{key}" if part else key: v.contiguous() for part, state in parts.items() for key, v in state.items()}

    def save(self, directory: str | Path) -> Path:
        """Write `config.json`, `scorer.safetensors` and, when adapted, `adapter/` and `heads.safetensors`."""
        if not self.scorers:
            raise RuntimeError("nothing to save: detector is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        config["layers"] = list(config["layers"]) if config["layers"] else None
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(self._state(), str(directory / SCORER_FILE))
        if self.config.lora is not None:
            self.backbone  # a loaded detector injects its adapter on first backbone use
            self._adapter.save_pretrained(str(directory / ADAPTER_DIR))
            self.heads.save(directory / HEADS_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, **overrides) -> "AnomalyDetector":
        """Rebuild a fitted detector; `overrides` may change runtime settings (device, batch_size, score …)."""
        directory = Path(directory)
        config_path, scorer_path = directory / CONFIG_FILE, directory / SCORER_FILE
        if not config_path.is_file() or not scorer_path.is_file():
            raise UserInputError(f"{directory}: not a model directory (needs {CONFIG_FILE} and {SCORER_FILE})")
        try:
            raw = json.loads(config_path.read_text())
            known = {f.name for f in fields(DetectorConfig)}
            config = DetectorConfig(**{k: v for k, v in raw.items() if k in known})
            config.layers = tuple(config.layers) if config.layers else None
            config.scales = tuple(config.scales)
            state = load_file(str(scorer_path))
        except (ValueError, TypeError, OSError) as exc:
            raise UserInputError(f"{directory}: unreadable model directory ({exc})") from None
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            part, _, name = key.rpartition(".")
            parts.setdefault(part, {})[name] = value
        score = overrides.pop("score", None)
        detector = cls(config, **overrides)
        for i in range(len(config.views())):
            scorer = make_scorer(config.scorer, config.coreset_ratio, config.max_bank_candidates, config.seed)
            scorer.load_state_dict(parts[f"view{i}" if i else ""])
            detector.scorers.append(scorer)
        if "foreground" in parts:
            detector.foreground_model = ForegroundModel()
            detector.foreground_model.load_state_dict(parts["foreground"])
        if config.lora is not None:
            detector.heads = AnomalyHeads.load(directory / HEADS_FILE)
            detector._adapter_dir = directory / ADAPTER_DIR
        if score not in (None, config.score):  # models saved before score modes have no mode_thresholds
            detector.use_score(score)
        return detector
