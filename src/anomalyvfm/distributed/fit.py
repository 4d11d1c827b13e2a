"""Fit on Ray: training features extracted in parallel actors, merged on the driver.

The driver runs the whole local `AnomalyDetector.fit` (auto choice, calibration on validation images,
saving) with one stage replaced: `RayPipeline.fit_scorers` splits the training images into one
contiguous shard per worker; each actor loads the backbone once and streams its shard into fresh,
unfinalised scorers (`Pipeline.accumulate`); the driver merges those streaming states (`merge`:
Mahalanobis sums add exactly; kNN reservoirs merge into a uniform sample of all patches, see
`KNNScorer.merge`) and finalises them as a local fit would. The model directory is the same as a local
fit's. A worker that dies is restarted and its shard redone.
"""
from __future__ import annotations

from typing import Any, Sequence

from anomalyvfm.data.images import ImageLike
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.detector.pipeline import Pipeline
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import UserInputError

SHARD_RETRIES = 3


class ShardWorker:
    """A Ray actor holding the backbone; `accumulate` streams one shard into unfinalised scorers."""

    def __init__(self, settings: Settings, runtime: Runtime, backbone_source: str) -> None:
        self.pipeline = Pipeline(settings, runtime)
        self.pipeline.load_backbone(backbone_source)

    def accumulate(self, images: list[str], total: int, shard: int) -> tuple[list[Any], Any, Any, int]:
        count = self.pipeline.accumulate(images, progress=False, total=total, shard=shard)
        return self.pipeline.scorers, self.pipeline.foreground_model, self.pipeline.image_bank, count


class RayPipeline(Pipeline):
    """A `Pipeline` whose scorer fitting runs on Ray actors; every other stage runs on the driver."""

    def __init__(self, settings: Settings, runtime: Runtime, ray: Any, workers: int) -> None:
        super().__init__(settings, runtime)
        self.ray, self.workers = ray, workers

    def fit_scorers(self, images: Sequence[ImageLike], progress: bool, out_of_fold: bool = False) -> int:
        if out_of_fold:  # shards index their images from 0 and would need their features back on the driver
            raise UserInputError("--threshold-rule budget needs out-of-fold scores of the training images, which "
                                 "--engine ray fits do not compute: fit with --engine local")
        if any(not isinstance(image, str) and not hasattr(image, "__fspath__") for image in images):
            raise UserInputError("--engine ray fits on image paths (workers read the files themselves)")
        paths = [str(image) for image in images]
        n = min(self.workers, len(paths))
        size = -(-len(paths) // n)
        shards = [paths[i:i + size] for i in range(0, len(paths), size)]
        actor = self.ray.remote(num_cpus=1, max_restarts=SHARD_RETRIES, max_task_retries=SHARD_RETRIES)(ShardWorker)
        actors = [actor.remote(self.settings, self.runtime, self.backbone_source) for _ in shards]
        try:
            parts = self.ray.get([a.accumulate.remote(shard, len(paths), i) for i, (a, shard) in
                                  enumerate(zip(actors, shards))])
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, UserInputError):
                raise UserInputError(str(exc.cause)) from None
            raise
        finally:
            for a in actors:
                self.ray.kill(a)
        self.scorers, self.foreground_model, self.image_bank, fitted = parts[0]
        for scorers, foreground, bank, count in parts[1:]:
            self.image_bank.merge(bank)
            for mine, theirs in zip(self.scorers, scorers):
                mine.merge(theirs)
            if self.foreground_model is not None:
                self.foreground_model.merge(foreground)
            fitted += count
        self.finalize_scorers()
        return fitted


def ray_detector(ray: Any, workers: int):
    """A factory of unfitted detectors whose `fit` extracts training features on `workers` Ray actors."""

    def make(settings: Settings, runtime: Runtime) -> AnomalyDetector:
        if settings.lora is not None:
            raise UserInputError("--engine ray does not fit LoRA adapters (train them with --engine local)")
        detector = AnomalyDetector(settings, runtime)
        detector.pipeline = RayPipeline(detector.settings, detector.runtime, ray, workers)
        return detector

    return make
