"""A loaded detector whose `predict_iter` runs on Ray actors: `evaluate` and `export-submission` on Ray.

Those commands need every prediction whole (maps included) and in input order, and they use the rest
of the detector (thresholds, features for the report) on the driver. `RayDetector` keeps the driver's
detector for all of that and replaces only `predict_iter`: actors send each `Prediction` back pickled,
tagged with its input position, and the driver yields them in order (holding back only those that
arrive early).
"""
from __future__ import annotations

import pickle
from typing import Any, Iterator, Sequence

from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.distributed.predict import ScoringActor, blocks_of, map_on_actors
from anomalyvfm.errors import UserInputError
from anomalyvfm.prediction import Prediction


class PredictionActor(ScoringActor):
    """A Ray Data actor sending back whole predictions (maps, masks) of a batch of `(index, path)` rows."""

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        blobs = [pickle.dumps(pred) for pred in self.detector.predict_iter(paths, progress=None)]
        return pa.table({"index": batch.column("index"), "prediction": pa.array(blobs, pa.binary())})


class RayDetector:
    """`detector` with `predict_iter` on `workers` Ray actors; every other attribute is the driver's."""

    def __init__(self, detector: AnomalyDetector, model: str, runtime: dict[str, Any], ray: Any, workers: int,
                 gpus: float) -> None:
        self._detector, self._model, self._runtime, self._ray = detector, model, runtime, ray
        self._workers, self._gpus = workers, gpus

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)

    def predict_iter(self, images: Sequence[Any], progress: str | None = None, decide: bool = True) -> Iterator[Prediction]:
        import pyarrow as pa

        if not decide:
            raise ValueError("RayDetector always decides (thresholds apply on the workers)")
        if any(not isinstance(image, str) and not hasattr(image, "__fspath__") for image in images):
            raise UserInputError("--engine ray scores image paths (workers read the files themselves)")
        paths = [str(image) for image in images]
        if not paths:
            return
        runtime = self._runtime
        blocks = [pa.table({"index": pa.array(range(start, start + len(chunk)), pa.int64()), "path": chunk})
                  for start, chunk in blocks_of(paths, int(runtime.get("batch_size") or 8), self._workers)]
        dataset = map_on_actors(self._ray, blocks, PredictionActor, (self._model, runtime, None),
                                int(runtime.get("batch_size") or 8), self._workers, self._gpus)
        early: dict[int, Prediction] = {}
        position = 0
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for index, blob in zip(batch.column("index").to_pylist(), batch.column("prediction").to_pylist()):
                early[index] = pickle.loads(blob)
            while position in early:
                yield early.pop(position)
                position += 1
