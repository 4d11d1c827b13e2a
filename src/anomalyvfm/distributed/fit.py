"""Fit on Ray: training features extracted in parallel actors, merged on the driver.

The driver runs the whole local `AnomalyDetector.fit` (auto choice, calibration on validation images,
saving) with one stage plugged in: `RayAccumulator`, the pipeline's accumulator, splits the training images into one
contiguous shard per worker; each actor loads the backbone once and streams its shard into fresh,
unfinalised scorers (`detector.pipeline.accumulate`); the driver merges those streaming states (`merge`:
Mahalanobis sums add exactly; kNN reservoirs merge into a uniform sample of all patches, see
`KNNScorer.merge`) and finalises them as a local fit would. The model directory is the same as a local
fit's. A worker that dies is restarted and its shard redone.
"""
from __future__ import annotations

from typing import Any, Sequence

from anomalyvfm.data.images import ImageLike
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.detector.pipeline import FitParts, Pipeline, accumulate
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.errors import UserInputError

SHARD_RETRIES = 3


class ShardWorker:
    """A Ray actor holding the backbone; `accumulate` streams one shard into unfinalised fitting parts."""

    def __init__(self, settings: Settings, runtime: Runtime, backbone_source: str) -> None:
        self.pipeline = Pipeline(settings, runtime)
        self.pipeline.load_backbone(backbone_source)

    def accumulate(self, images: list[str], total: int, shard: int) -> FitParts:
        return accumulate(self.pipeline, images, progress=False, total=total, shard=shard)


class RayAccumulator:
    """A fit's engine (`Pipeline.accumulator`) that streams shards of the training images on Ray actors and
    merges their parts; every other stage of the fit runs on the driver."""

    def __init__(self, ray: Any, workers: int) -> None:
        self.ray, self.workers = ray, workers

    def __call__(self, pipeline: Pipeline, images: Sequence[ImageLike], progress: bool) -> FitParts:
        if any(not isinstance(image, str) and not hasattr(image, "__fspath__") for image in images):
            raise UserInputError("--engine ray fits on image paths (workers read the files themselves)")
        paths = [str(image) for image in images]
        n = min(self.workers, len(paths))
        size = -(-len(paths) // n)
        shards = [paths[i:i + size] for i in range(0, len(paths), size)]
        actor = self.ray.remote(num_cpus=1, max_restarts=SHARD_RETRIES, max_task_retries=SHARD_RETRIES)(ShardWorker)
        actors = [actor.remote(pipeline.settings, pipeline.runtime, pipeline.backbone_source) for _ in shards]
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
        for other in parts[1:]:
            parts[0].merge(other)
        return parts[0]


def ray_detector(ray: Any, workers: int):
    """A factory of unfitted detectors whose `fit` extracts training features on `workers` Ray actors."""

    def make(settings: Settings, runtime: Runtime) -> AnomalyDetector:
        if settings.lora is not None:
            raise UserInputError("--engine ray does not fit LoRA adapters (train them with --engine local)")
        return AnomalyDetector(settings, runtime, accumulator=RayAccumulator(ray, workers))

    return make
