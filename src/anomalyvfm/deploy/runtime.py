"""Run a model without torch: OpenVINO or ONNX Runtime for the backbone (a graph form), numpy for the rest.

`GraphPredictor` has the surface the CLI, the evaluation and the service use on `AnomalyDetector`:
`predict_iter(images, progress, decide)` → `Prediction`, `settings` and the thresholds (`prediction.Predictor`).
Pre-processing is `data.transforms`, and everything after the backbone is the `head.ScoringHead` the
torch pipeline itself scores with, so the only difference from the fitted model is the engine's arithmetic.
Only tile stitching is re-stated here (a sum and a renormalisation, as `extraction._Stitch`).

Decoding and resizing run one thread ahead of inference (`prefetch`); the engine itself uses every core and
takes the crops of `batch_size` images at a time.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import resized_unit
from anomalyvfm.deploy.bundle import CPU_NEEDS, GRAPH_FILES
from anomalyvfm.detector.model_dir import StoredModel
from anomalyvfm.detector.settings import Runtime
from anomalyvfm.errors import ImageReadError, UserInputError
from anomalyvfm.features.tiles import Tiling, crops, describe, prefetch, view_size
from anomalyvfm.head.calibration import Thresholds
from anomalyvfm.head.head import ScoringHead
from anomalyvfm.head.search import cpu_capabilities
from anomalyvfm.prediction import ImageViews, Prediction

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: quantised ops int8, the rest f32


def view_crops(image: np.ndarray, image_size: int, tiling: Tiling | None, patch: int):
    """(processed shape, [(top, left, `3xhxw` [0, 1] crop)]) of one view of an `HxWx3 uint8` image."""
    size = view_size(*image.shape[:2], image_size, tiling, patch)
    return size, crops(resized_unit(image, size), tiling)


class Engine:
    """The compiled backbone graph: `(B, 3, H, W)` [0, 1] images → `(B, h*w, C)` patch features."""

    def __init__(self, directory: Path, form: dict) -> None:
        geometry = form["backbone"]
        self.patch_size, self.hidden_size = int(geometry["patch_size"]), int(geometry["hidden_size"])
        self.feature_dim = int(geometry["feature_dim"])
        self.format, self.precision = form["format"], form["precision"]
        graph = directory / GRAPH_FILES[self.format][0]
        try:
            self._run = self._openvino(graph) if self.format == "openvino" else self._onnx(graph)
        except ImportError as exc:
            extra = "openvino" if self.format == "openvino" else "onnx"
            raise UserInputError(f"{directory}: running a {self.format} graph needs {exc.name}: "
                                 f"pip install 'anomalyvfm[{extra}]'") from None
        except RuntimeError as exc:  # the engines' own "cannot read/compile this graph"
            raise UserInputError(f"{graph}: the engine cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None

    def _openvino(self, graph: Path) -> Callable[[np.ndarray], np.ndarray]:
        import openvino as ov

        need = CPU_NEEDS.get(self.precision)
        if need and need not in cpu_capabilities():
            raise UserInputError(f"{graph.parent}: this CPU cannot run {self.precision} (OpenVINO reports no {need}); "
                                 "export the model again with --precision fp32")
        compiled = ov.Core().compile_model(str(graph), "CPU", {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[self.precision], "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return lambda batch: request.infer([batch])[0].copy()

    def _onnx(self, graph: Path) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))


@dataclass
class _Prepared:
    """One decoded image cut into each view's crops (built in the prefetch thread)."""

    source: str
    image_shape: tuple[int, int]
    views: list  # per view: (processed shape, [(top, left, crop)])


class GraphPredictor:
    """A fitted model whose backbone runs as an exported graph (a form of a model directory, or an earlier
    bundle); see the module docstring. `runtime` holds `Runtime` options (batch size, score, device …)."""

    def __init__(self, stored: StoredModel, graph_dir: Path, form: dict, **runtime: Any) -> None:
        self.directory, self.form = Path(graph_dir), form
        self.runtime = Runtime(**runtime)
        self.settings, self.record, self.calibration = stored.settings, stored.record, stored.calibration
        self.version = stored.version  # "" for a bundle of the earlier format
        self.score_mode = self.runtime.score or self.calibration.mode
        if self.score_mode != "distance":
            raise UserInputError(f"{self.directory}: an exported backbone scores 'distance' only (the LoRA heads are "
                                 f"not exported; asked for '{self.score_mode}'): use --score distance or --runtime torch")
        if self.runtime.device != "cpu":
            raise UserInputError(f"{self.directory}: an exported backbone runs on the CPU "
                                 f"(asked for device '{self.runtime.device}')")
        self.arrays = stored.head
        self.views = self.settings.views()
        self._engine: Engine | None = None
        self.head: ScoringHead | None = None

    def thresholds(self) -> Thresholds:
        """The exported score mode's thresholds and the validation statistics behind them."""
        return self.calibration.thresholds()

    def load_engine(self) -> Engine:
        """The compiled graph, compiled (seconds) on the first call, with the scoring head (its kNN search
        compiled on OpenVINO for OpenVINO graphs); later calls return it."""
        if self._engine is None:
            self._engine = Engine(self.directory, self.form)
            search = "openvino" if self._engine.format == "openvino" else "numpy"
            self.head = ScoringHead(self.settings.head_config(), self.arrays, search)
        return self._engine

    # -- the pipeline ---------------------------------------------------------------------------
    def _prepare(self, indexed: tuple[int, ImageLike]) -> _Prepared | tuple[str, str]:
        index, image = indexed
        source = describe(image, index)
        try:
            rgb = load_rgb(image, max_aspect=None if self.settings.tile_size else self.runtime.max_aspect_ratio)
        except ImageReadError as exc:
            return source, str(exc)
        patch = self.form["backbone"]["patch_size"]
        return _Prepared(source, rgb.shape[:2], [view_crops(rgb, size, tiling, patch) for size, tiling in self.views])

    def _features(self, views: list[tuple[tuple[int, int], list]]) -> list[np.ndarray]:
        """`(h, w, C)` features of one view of several images: crops of one shape run together in batches of
        `batch_size` — across images too, which measured 1.2–1.3x faster per image than one image a call
        (OpenVINO bf16, 448 px) — then are stitched per image, each block renormalised where crops overlap."""
        engine = self.load_engine()
        patch = engine.patch_size
        grids = [np.zeros((size[0] // patch, size[1] // patch, engine.feature_dim), np.float32) for size, _ in views]
        by_shape: dict[tuple[int, ...], list] = defaultdict(list)
        for index, (_, pieces) in enumerate(views):
            for top, left, crop in pieces:
                by_shape[crop.shape].append((index, top // patch, left // patch, crop))
        for jobs in by_shape.values():
            for start in range(0, len(jobs), self.runtime.batch_size):
                chunk = jobs[start : start + self.runtime.batch_size]
                out = engine(np.stack([crop for *_, crop in chunk]))
                for (index, top, left, crop), feats in zip(chunk, out):
                    h, w = crop.shape[1] // patch, crop.shape[2] // patch
                    grids[index][top : top + h, left : left + w] += feats.reshape(h, w, -1)
        for grid, (_, pieces) in zip(grids, views):
            if len(pieces) > 1:  # the normalised mean of unit vectors, per block (as extraction._Stitch)
                blocks = grid.reshape(*grid.shape[:2], -1, engine.hidden_size)
                blocks /= np.maximum(np.linalg.norm(blocks, axis=-1, keepdims=True), 1e-12)
        return grids

    def _predict_batch(self, items: list[_Prepared], decide: bool) -> list[Prediction]:
        """Predictions of several decoded images, their backbone work batched (`_features`)."""
        per_view = [self._features([item.views[v] for item in items]) for v in range(len(self.views))]
        thresholds = self.thresholds() if decide else None
        return [self.head.predict([grids[k] for grids in per_view], item.source, item.views[-1][0], item.image_shape,
                                  self.calibration, self.score_mode, thresholds) for k, item in enumerate(items)]

    def predict_iter(self, images: Sequence[ImageLike], progress: str | None = "predict",
                     decide: bool = True) -> Iterator[Prediction]:
        """Yield a `Prediction` per image, in order; unreadable images yield one with `error` set.

        Decoded images wait in groups of `batch_size` so the engine runs them together; an unreadable
        image closes the group first, so the order of results is the order of `images`.
        """
        self.load_engine()  # compile before the progress bar starts
        bar = tqdm(total=len(images), desc=progress, disable=progress is None, unit="img")
        pending: list[_Prepared] = []

        def flush() -> Iterator[Prediction]:
            for pred in self._predict_batch(pending, decide) if pending else ():
                bar.update(1)
                yield pred
            pending.clear()

        for item in prefetch(self._prepare, enumerate(images)):
            if isinstance(item, tuple):
                yield from flush()
                bar.update(1)
                yield Prediction(source=item[0], error=item[1])
                continue
            pending.append(item)
            if len(pending) >= self.runtime.batch_size:
                yield from flush()
        yield from flush()
        bar.close()

    def predict(self, images: Sequence[ImageLike], progress: bool = True) -> list[Prediction]:
        return list(self.predict_iter(images, "predict" if progress else None))

    def view_features(self, images: Sequence[ImageLike], progress: str | None = None) -> Iterator[ImageViews]:
        """Every view's features of each image as the scoring head takes them (`anomalyvfm update`)."""
        self.load_engine()
        for item in tqdm(prefetch(self._prepare, enumerate(images)), desc=progress, disable=progress is None,
                         total=len(images), unit="img"):
            if isinstance(item, tuple):
                yield ImageViews(item[0], [], error=item[1])
            else:
                yield ImageViews(item.source, [self._features([view])[0] for view in item.views], item.views[-1][0],
                                 item.image_shape)

    def features(self, images: Sequence[ImageLike]) -> Iterator[SimpleNamespace]:
        """The reference view's `(h, w, C)` features per image, or its `error` (for the evaluation's PCA picture)."""
        for item in prefetch(self._prepare, enumerate(images)):
            if isinstance(item, tuple):
                yield SimpleNamespace(source=item[0], error=item[1])
            else:
                yield SimpleNamespace(source=item.source, features=self._features([item.views[-1]])[0])

