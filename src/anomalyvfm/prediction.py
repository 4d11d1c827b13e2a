"""`Prediction`: what every predictor (the torch detector, an exported bundle) returns for one image, and
`Predictor`: the surface both offer to the front ends and to evaluation.

Kept free of torch so that a runtime without torch can produce and consume it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np


@dataclass
class Prediction:
    """Result for one image. On a read failure `error` is set and the other fields are empty."""

    source: str
    score: float = float("nan")
    is_anomalous: bool = False
    anomaly_map: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: str | None = None


@dataclass
class ImageViews:
    """Every view's `(h, w, C)` patch features of one image (finest last), as the scoring head takes them;
    on a read failure `error` is set and `views` is empty. What `anomalyvfm update` adds to a model."""

    source: str
    views: list[np.ndarray]
    processed_shape: tuple[int, int] = (0, 0)  # the reference view's backbone input (height, width)
    image_shape: tuple[int, int] = (0, 0)
    error: str | None = None


class Predictor(Protocol):
    """What `evaluate`, `predict` and the service need of a model: `AnomalyDetector` and the exported
    `GraphPredictor` both satisfy it, so those front ends run either without knowing which one they hold."""

    settings: Any
    record: Any
    score_mode: str
    version: str  # the model's content identity (`model_dir.StoredModel.version`; "" if unknown)

    def thresholds(self) -> Any: ...

    def predict_iter(self, images: Sequence[Any], progress: str | None = "predict",
                     decide: bool = True) -> Iterator[Prediction]: ...

    def features(self, images: Sequence[Any]) -> Iterator[Any]: ...

    def view_features(self, images: Sequence[Any], progress: str | None = None) -> Iterator[ImageViews]: ...
