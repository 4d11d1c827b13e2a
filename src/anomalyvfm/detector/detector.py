"""`AnomalyDetector`: the fit/predict surface, a thin facade over parts that each own one thing.

* `settings.Settings` / `settings.Runtime` — what is computed / how this process runs it;
* `pipeline.Pipeline` — the fitted parts and the path of an image through them;
* `calibration.Calibration` — thresholds and statistics learned from validation images;
* `model_dir` — the files of a saved model.

    detector = AnomalyDetector(backbone="facebook/dinov2-small").fit(good_paths, validation_paths)
    detector.save("model");  AnomalyDetector.load("model").predict(new_paths)
"""
from __future__ import annotations

import warnings
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

from anomalyvfm.adaptation.training import train_adapter
from anomalyvfm.data.datasets import hold_out
from anomalyvfm.data.images import ImageLike
from anomalyvfm.declare import SettingError
from anomalyvfm.detector import model_dir
from anomalyvfm.detector.calibration import calibrate
from anomalyvfm.detector.defect_thresholds import CalibrationDefectsWarning, calibration_warnings
from anomalyvfm.detector.defects import DefectSet, check_defects_allowed, fit_defects, outlined
from anomalyvfm.detector.pipeline import Accumulator, Pipeline, accumulate
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import NotFittedError, UserInputError
from anomalyvfm.features.extraction import FailedImage, ImageFeatures
from anomalyvfm.head.calibration import Calibration, Thresholds
from anomalyvfm.prediction import ImageViews, Prediction
from anomalyvfm.scoring.names import AUTO
from anomalyvfm.version import __version__

__all__ = ["AnomalyDetector", "Prediction"]


class AnomalyDetector:
    """Fit on good images, then score new ones: `AnomalyDetector(backbone=DIR).fit(paths).predict(paths)`.

    Keyword options are any `Settings` or `Runtime` field (`image_size=448`, `scorer="knn"`, `batch_size=4`);
    `accumulator` is how a fit streams its training images (this process by default; `distributed.fit`).
    """

    def __init__(self, settings: Settings | None = None, runtime: Runtime | None = None,
                 accumulator: Accumulator = accumulate, **options: Any) -> None:
        names = {"settings": {f.name for f in fields(Settings)}, "runtime": {f.name for f in fields(Runtime)}}
        unknown = sorted(set(options) - names["settings"] - names["runtime"])
        if unknown:
            raise TypeError(f"unknown setting{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
        settings = replace(settings or Settings(), **{k: v for k, v in options.items() if k in names["settings"]})
        runtime = replace(runtime or Runtime(), **{k: v for k, v in options.items() if k in names["runtime"]})
        if settings.lora is None and runtime.score not in (None, "distance"):
            raise SettingError(f"{{score}} {runtime.score} needs LoRA heads: fit with {{lora}}")
        self.pipeline = Pipeline(settings, runtime, accumulator)
        self.calibration: Calibration | None = None
        self.record = model_dir.FitRecord()
        self.version = ""  # `StoredModel.version` once loaded: what the inspection store names as the judge

    @property
    def settings(self) -> Settings:
        return self.pipeline.settings

    @property
    def runtime(self) -> Runtime:
        return self.pipeline.runtime

    # -- fit ------------------------------------------------------------------------------------------
    def fit(self, images: Sequence[ImageLike], validation_images: Sequence[ImageLike] | None = None,
            progress: bool = True, calibration_defects: str | Path | None = None,
            defects: DefectSet | None = None) -> "AnomalyDetector":
        """Learn normal patch statistics from `images`, then thresholds from `validation_images` — and, with
        `calibration_defects` (a folder of labelled defects), from those too (`defect_thresholds`). With
        `defects` (labelled real defects, `detector.defects`), their patches become evidence in the score;
        they set no threshold. Thresholds from fewer than ten labelled defects, or from defects the model also
        learns, were measured to lower SegF1: a `CalibrationDefectsWarning` says so before anything is fitted.

        Without validation images a seeded 10 % of `images` is held out, so thresholds never come from
        the same images the statistics were fitted on.
        """
        images = list(images)
        if validation_images is None:
            train, validation = hold_out(len(images), self.settings.seed)
            images, validation_images = [images[i] for i in train], [images[i] for i in validation]
        validation_images, mode = list(validation_images), self.runtime.score or "distance"
        if not images:
            raise UserInputError("no training images given")
        if defects is not None:
            check_defects_allowed(self.settings, defects)
        if calibration_defects is not None:
            for text in calibration_warnings(calibration_defects, defects):
                warnings.warn(text, CalibrationDefectsWarning, stacklevel=2)
        if self.settings.auto:
            from anomalyvfm.detector.auto import choose_settings

            self.record.auto_choice = choose_settings(self.settings, self.runtime, images, validation_images, progress)
            self.pipeline.configure(**self.record.auto_choice["chosen"])
        backbone = self.pipeline.load_backbone()
        if self.settings.lora is not None:
            s = self.settings
            adapter, heads, self.record.lora = train_adapter(backbone, images, validation_images, s.lora, s.image_size,
                                                             s.seed, progress, outlined(defects))
            self.pipeline.adapt(adapter, heads)
        self.record.train_images = self.pipeline.fit_scorers(images, progress, self.settings.out_of_fold)
        self.calibration = calibrate(self.pipeline, validation_images, mode, progress)
        if self.settings.auto or self.settings.image_evidence == AUTO:  # chosen on the fitted, calibrated model
            from anomalyvfm.detector.evidence import settle_image_evidence

            self.calibration, self.record.auto_choice["image_evidence"] = settle_image_evidence(
                self.pipeline, self.calibration, validation_images, mode, progress)
        if defects is not None:
            self.calibration, self.record.defects = fit_defects(self.pipeline, self.calibration, defects, validation_images,
                                                                mode, progress)
        if calibration_defects is not None:
            from anomalyvfm.detector.defect_thresholds import calibrate_on_defects

            thresholds, self.record.calibration_defects = calibrate_on_defects(self, validation_images, calibration_defects)
            self.calibration = replace(self.calibration, modes={**self.calibration.modes, self.score_mode: thresholds})
        self.record.package_version = __version__
        self.record.fitted_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return self

    # -- predict --------------------------------------------------------------------------------------
    def _calibrated(self) -> Calibration:
        """The calibration, or `NotFittedError`: the one check behind predict, thresholds, save and export."""
        if self.calibration is None:
            raise NotFittedError()
        return self.calibration

    @property
    def score_mode(self) -> str:
        """The score mode predictions use: the runtime's choice, else the fitted one (`NotFittedError` before
        fit or load, even with a runtime choice: no mode is usable without thresholds)."""
        fitted = self._calibrated().mode
        return self.runtime.score or fitted

    def thresholds(self) -> Thresholds:
        """Image and pixel thresholds of the score mode in use, with their validation statistics."""
        return self._calibrated().thresholds(self.score_mode)

    def use_score(self, mode: str) -> None:
        """Judge with score `mode` from now on (its thresholds were fitted with the others)."""
        self._calibrated().thresholds(mode)
        self.pipeline.use_runtime(score=mode)

    def predict_iter(self, images: Sequence[ImageLike], progress: str | None = "predict",
                     decide: bool = True) -> Iterator[Prediction]:
        """Yield a `Prediction` per image, in order; unreadable images yield one with `error` set."""
        return self.pipeline.predict(images, self._calibrated(), self.score_mode, decide, progress)

    def predict(self, images: Sequence[ImageLike], progress: bool = True) -> list[Prediction]:
        """Score all images; see `predict_iter` to stream results for large batches."""
        return list(self.predict_iter(images, "predict" if progress else None))

    def features(self, images: Sequence[ImageLike], progress: str | None = None) -> Iterator[ImageFeatures | FailedImage]:
        """Patch features of each image at the reference view (for analyses such as the report's PCA)."""
        return self.pipeline.features(images, progress)

    def view_features(self, images: Sequence[ImageLike], progress: str | None = None) -> Iterator[ImageViews]:
        """Every view's features of each image as the scoring head takes them (`anomalyvfm update`)."""
        return self.pipeline.image_views(images, progress)

    def summary(self) -> str:
        """The settings that define what is computed, in one line (fit output, benchmark tables)."""
        fitted = self.calibration is not None and self.calibration.foreground
        return self.settings.summary(self.calibration.suppress_background if fitted else None)

    # -- files ----------------------------------------------------------------------------------------
    def save(self, directory: str | Path, store_backbone: bool = True) -> Path:
        """Write the model directory (atomically; see `model_dir`). With `store_backbone=False` it only
        references the backbone (hub id or path), as models of anomalyvfm 0.1 did."""
        stored = model_dir.StoredModel(Path(directory), self.settings, self._calibrated(), self.record,
                                       self.pipeline.head.state_dict())
        return model_dir.write(directory, stored, lambda folder: self.pipeline.save_parts(folder, store_backbone))

    @classmethod
    def load(cls, directory: str | Path, backbone: str | Path | None = None, **runtime: Any) -> "AnomalyDetector":
        """Rebuild a saved detector. `runtime` options (device, batch_size, precision, score) apply to this
        process only; `backbone` locates the weights of a model saved by reference."""
        return cls.from_stored(model_dir.read(directory), backbone, **runtime)

    @classmethod
    def from_stored(cls, stored: model_dir.StoredModel, backbone: str | Path | None = None,
                    **runtime: Any) -> "AnomalyDetector":
        """`load` from an already read model directory (`deploy.load` reads it once to choose the backend)."""
        runtime = Runtime(**runtime)
        stored.calibration.thresholds(runtime.score)  # a mode this model was not fitted for fails here, in one line
        detector = cls(stored.settings, runtime)
        detector.pipeline = Pipeline.restore(stored, detector.runtime, backbone)
        detector.calibration, detector.record, detector.version = stored.calibration, stored.record, stored.version
        return detector
