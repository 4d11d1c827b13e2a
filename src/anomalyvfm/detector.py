"""`AnomalyDetector`: the fit/predict surface that ties backbone, features, scorer and maps together.

State lives in one place: a `DetectorConfig` (everything needed to rebuild the detector, saved as
`config.json`) plus the fitted scorer's tensors (saved as `scorer.safetensors`). The backbone is not
copied into the model directory; `config.backbone` names the hub id or local directory it came from.
A LoRA-adapted detector (`config.lora` set) also saves its peft adapter (`adapter/`) and anomaly heads
(`heads.safetensors`); thresholds are kept for every score mode, so `load(..., score=MODE)` switches.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anomalyvfm.adaptation import load_lora
from anomalyvfm.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from anomalyvfm.data.images import ImageLike
from anomalyvfm.errors import UserInputError
from anomalyvfm.features import FailedImage, ImageFeatures, extract_features
from anomalyvfm.heads import AnomalyHeads
from anomalyvfm.maps import RunningMoments, anomaly_map, sigma_threshold
from anomalyvfm.score_modes import SCORE_MODES, RawScores, combine, fusion_stats, raw_scores
from anomalyvfm.scoring import SCORERS, PatchScorer, make_scorer
from anomalyvfm.training import AdaptationConfig, train_adapter

CONFIG_FILE = "config.json"
SCORER_FILE = "scorer.safetensors"
ADAPTER_DIR = "adapter"
HEADS_FILE = "heads.safetensors"


@dataclass
class DetectorConfig:
    """Every setting of a detector. Thresholds are filled by `fit` from validation (good) images only."""

    backbone: str = DEFAULT_BACKBONE
    layers: tuple[int, ...] | None = None  # None: backbone.default_layers(depth), filled in at load
    image_size: int = 448
    scorer: str = "mahalanobis"
    coreset_ratio: float = 0.1
    max_bank_candidates: int = 100_000
    top_percent: float = 1.0
    sigma: float = 4.0
    threshold_sigma: float = 3.0
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    precision: str = "fp32"
    pixel_threshold: float | None = None
    image_threshold: float | None = None
    validation_stats: dict = field(default_factory=dict)
    train_images: int = 0
    score: str = "distance"  # distance | head | fusion (see score_modes); head and fusion need lora
    lora: dict | None = None  # AdaptationConfig fields; None: frozen backbone
    lora_record: dict = field(default_factory=dict)  # what training did: steps, best step, seconds
    fusion_stats: dict = field(default_factory=dict)
    mode_thresholds: dict = field(default_factory=dict)  # score mode -> thresholds and validation stats
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


@dataclass
class Prediction:
    """Result for one image. On a read failure `error` is set and the other fields are empty."""

    source: str
    score: float = float("nan")
    is_anomalous: bool = False
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None


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
        self.scorer: PatchScorer | None = None
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

    def features(self, images: Sequence[ImageLike], progress: str | None = None) -> Iterator[ImageFeatures | FailedImage]:
        """Patch features of each image, in order (a `FailedImage` for unreadable ones)."""
        return extract_features(self.backbone, images, self.config.image_size, self.config.batch_size, progress)

    def _raw_scores(self, item: ImageFeatures) -> RawScores:
        if self.scorer is None:
            raise RuntimeError("detector is not fitted: call fit() or AnomalyDetector.load()")
        return raw_scores(self.scorer, self.heads, item.features, self.config.top_percent)

    def scores(self, item: ImageFeatures) -> tuple[torch.Tensor, float]:
        """`(h, w)` anomaly scores of one image's patches and its image score, in the configured score mode."""
        return combine(self._raw_scores(item), self.config.score, self.config.fusion_stats)

    def patch_scores(self, item: ImageFeatures) -> torch.Tensor:
        """`(h, w)` anomaly scores of one image's patches."""
        return self.scores(item)[0]

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
            order = list(range(len(images)))
            random.Random(self.config.seed).shuffle(order)
            n_val = max(1, round(0.1 * len(images))) if len(images) > 1 else 0
            validation_images = [images[i] for i in sorted(order[:n_val])]
            images = [images[i] for i in sorted(order[n_val:])]
        if not images:
            raise UserInputError("no training images given")
        if self.config.lora is not None:
            self._adapt(images, list(validation_images), progress)
        torch.manual_seed(self.config.seed)
        scorer = make_scorer(self.config.scorer, self.config.coreset_ratio, self.config.max_bank_candidates, self.config.seed)
        fitted = 0
        for item in self.features(images, "features (train)" if progress else None):
            if isinstance(item, FailedImage):
                raise UserInputError(f"training image unreadable: {item.error}")
            scorer.partial_fit(item.features.reshape(-1, item.features.shape[-1]))
            fitted += 1
        scorer.finalize()
        self.scorer = scorer
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
        outputs = []
        for item in self.features(images, "thresholds (validation)" if progress else None):
            if isinstance(item, FailedImage):
                raise UserInputError(f"validation image unreadable: {item.error}")
            outputs.append((self._raw_scores(item), item.processed_shape, item.image_shape))
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

    def predict_iter(
        self, images: Sequence[ImageLike], progress: str | None = "predict", decide: bool = True
    ) -> Iterator[Prediction]:
        """Yield a `Prediction` per image, in order; unreadable images yield one with `error` set."""
        for item in self.features(images, progress):
            if isinstance(item, FailedImage):
                yield Prediction(source=item.source, error=item.error)
                continue
            scores, score = self.scores(item)
            amap = anomaly_map(scores, item.processed_shape, item.image_shape, self.config.sigma)
            pred = Prediction(source=item.source, score=score, anomaly_map=amap)
            if decide:
                pred.is_anomalous = bool(pred.score > self.config.image_threshold)
                pred.mask = amap > self.config.pixel_threshold
            yield pred

    def predict(self, images: Sequence[ImageLike], progress: bool = True) -> list[Prediction]:
        """Score all images; see `predict_iter` to stream results for large batches."""
        return list(self.predict_iter(images, "predict" if progress else None))

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write `config.json`, `scorer.safetensors` and, when adapted, `adapter/` and `heads.safetensors`."""
        if self.scorer is None:
            raise RuntimeError("nothing to save: detector is not fitted")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        config["layers"] = list(config["layers"]) if config["layers"] else None
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.scorer.state_dict().items()}, str(directory / SCORER_FILE))
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
            state = load_file(str(scorer_path))
        except (ValueError, TypeError, OSError) as exc:
            raise UserInputError(f"{directory}: unreadable model directory ({exc})") from None
        score = overrides.pop("score", None)
        detector = cls(config, **overrides)
        scorer = make_scorer(config.scorer, config.coreset_ratio, config.max_bank_candidates, config.seed)
        scorer.load_state_dict(state)
        detector.scorer = scorer
        if config.lora is not None:
            detector.heads = AnomalyHeads.load(directory / HEADS_FILE)
            detector._adapter_dir = directory / ADAPTER_DIR
        if score not in (None, config.score):  # models saved before score modes have no mode_thresholds
            detector.use_score(score)
        return detector
