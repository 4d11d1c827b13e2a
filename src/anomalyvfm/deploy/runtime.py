"""Run an inference bundle without torch: OpenVINO or ONNX Runtime for the backbone, numpy for the rest.

`BundlePredictor` has the surface the CLI, the evaluation and the service use on `AnomalyDetector`:
`predict_iter(images, progress, decide)` → `Prediction`, `settings` and the thresholds (`prediction.Predictor`). Pre-processing, scoring, view fusion, foreground suppression, maps and the image score
are the numpy functions the torch pipeline itself calls (`data.transforms`, `scoring.distances`,
`maps.anomaly_maps`, `scoring.pooling`), so the only difference from the fitted model is the engine's
arithmetic. Only tile stitching is re-stated here (a sum and a renormalisation, as `extraction._Stitch`).

Decoding and resizing run one thread ahead of inference (`prefetch`); the engine itself uses every core and
takes the crops of `batch_size` images at a time.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import resized_unit
from anomalyvfm.deploy.bundle import GRAPH_FILES, SCORER, read_manifest
from anomalyvfm.errors import ImageReadError, UserInputError
from anomalyvfm.features.tiles import Tiling, crops, describe, prefetch, view_size
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.maps.binarize import model_mask
from anomalyvfm.prediction import Prediction
from anomalyvfm.features.masks import foreground_mask
from anomalyvfm.scoring.distances import (fuse_views, knn_distance, mahalanobis_distance,
                                          suppress_background)
from anomalyvfm.scoring.image_evidence import fuse_image_evidence, global_distance, image_embedding
from anomalyvfm.scoring.pooling import image_score

OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: quantised ops int8, the rest f32
CPU_NEEDS = {"bf16": "BF16", "int8": "INT8"}  # OpenVINO CPU optimisation capability each precision needs
SHORTLIST = 8  # bank candidates per patch kept by the bf16 search, then re-ranked exactly in fp32
SEARCH_ROWS = 2048  # patches searched at once: bounds the (rows x bank) similarity matrix
# config keys added after the first bundles were exported, with what those bundles did
BUNDLE_DEFAULTS = {"evidence": {}, "image_evidence": "patch", "image_stats": {}, "binarize": "global",
                   "outline_only_flagged": False}


def views(config: SimpleNamespace) -> list[tuple[int, Tiling | None]]:
    """(image_size, tiling) of each view, coarsest first (as `DetectorConfig.views`)."""
    if config.tile_size:
        return [(config.image_size, Tiling(config.tile_size, config.tile_overlap, config.tile_scale))]
    return [(size, None) for size in sorted(config.scales or (config.image_size,))]


def view_crops(image: np.ndarray, image_size: int, tiling: Tiling | None, patch: int):
    """(processed shape, [(top, left, `3xhxw` [0, 1] crop)]) of one view of an `HxWx3 uint8` image."""
    size = view_size(*image.shape[:2], image_size, tiling, patch)
    return size, crops(resized_unit(image, size), tiling)


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin can run here (FP32, BF16, INT8 …)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class Engine:
    """The compiled backbone graph: `(B, 3, H, W)` [0, 1] images → `(B, h*w, C)` patch features."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        geometry = manifest["backbone"]
        self.patch_size, self.hidden_size = int(geometry["patch_size"]), int(geometry["hidden_size"])
        self.feature_dim = int(geometry["feature_dim"])
        self.format, self.precision = manifest["format"], manifest["precision"]
        graph = directory / GRAPH_FILES[self.format][0]
        try:
            self._run = self._openvino(graph) if self.format == "openvino" else self._onnx(graph)
        except ImportError as exc:
            extra = "openvino" if self.format == "openvino" else "onnx"
            raise UserInputError(f"{directory}: running a {self.format} bundle needs {exc.name}: "
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


class BankSearch:
    """kNN cosine distances to the bank on OpenVINO, equal to `scoring.distances.knn_distance`.

    On a CPU with bf16 units the bank product runs in bf16 (AMX) and keeps only the `SHORTLIST` most
    similar entries per patch; those are re-scored exactly in fp32 with numpy. bf16 similarities are off
    by ~2^-9, far less than the gap to the 8th neighbour, so the nearest entry is virtually always in the
    shortlist and the distances match fp32 (measured ≤ 1e-6 relative on magnetic_tile's 9280-entry bank,
    4x faster than numpy's fp32 product). Without bf16 units the fp32 product and max run in OpenVINO.
    """

    def __init__(self, bank: np.ndarray) -> None:
        import openvino as ov
        import openvino.opset13 as ops

        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.shortlist = "BF16" in cpu_capabilities() and len(self.bank) > SHORTLIST
        rows = ops.parameter([-1, self.bank.shape[1]], np.float32)
        similarity = ops.matmul(rows, ops.constant(self.bank), False, True)
        if self.shortlist:
            output = ops.topk(similarity, SHORTLIST, 1, "max", "none", "i32").output(1)
        else:
            output = ops.reduce_max(similarity, np.array([1]), False).output(0)
        compiled = ov.Core().compile_model(ov.Model([output], [rows]), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if self.shortlist else "f32", "PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = features.reshape(-1, features.shape[-1]).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
        out = []
        for start in range(0, len(x), SEARCH_ROWS):
            rows = np.ascontiguousarray(x[start : start + SEARCH_ROWS])
            found = self._request.infer([rows])[0]
            if self.shortlist:
                found = np.einsum("nc,nkc->nk", rows, self.bank[found]).max(axis=1)
            out.append(1 - found)
        return np.concatenate(out)


@dataclass
class _Prepared:
    """One decoded image cut into each view's crops (built in the prefetch thread)."""

    source: str
    image_shape: tuple[int, int]
    views: list  # per view: (processed shape, [(top, left, crop)])


class BundlePredictor:
    """A fitted detector loaded from an inference bundle; see the module docstring."""

    def __init__(self, directory: str | Path, batch_size: int | None = None, score: str | None = None,
                 device: str = "cpu", max_aspect_ratio: float | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.config = SimpleNamespace(**{**BUNDLE_DEFAULTS, **self.manifest["config"]})
        if batch_size is not None:
            if batch_size < 1:
                raise UserInputError(f"--batch-size must be at least 1, got {batch_size}")
            self.config.batch_size = batch_size
        if score not in (None, self.config.score):
            raise UserInputError(f"{self.directory}: an exported bundle scores '{self.config.score}' only "
                                 f"(asked for '{score}')")
        if device != "cpu":
            raise UserInputError(f"{self.directory}: an exported bundle runs on the CPU (asked for device '{device}')")
        self.config.precision = self.manifest["precision"]
        if max_aspect_ratio is not None:
            self.config.max_aspect_ratio = max_aspect_ratio
        # The surface `AnomalyDetector` offers to front ends (service, evaluate, the web page), read-only here.
        self.settings = self.runtime = self.config
        self.record = SimpleNamespace(train_images=self.config.train_images, fitted_at=self.config.fitted_at,
                                      package_version=self.config.version)
        self.score_mode = self.config.score
        try:
            with np.load(self.directory / SCORER, allow_pickle=False) as arrays:
                self.arrays = {key: arrays[key] for key in arrays.files}
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{self.directory / SCORER}: unreadable scorer arrays ({exc})") from None
        self.views = views(self.config)
        self._engine: Engine | None = None
        self._search: list[BankSearch] = []  # per view, with the engine, for OpenVINO kNN bundles

    def thresholds(self) -> SimpleNamespace:
        """The exported score mode's thresholds and the validation statistics behind them."""
        c = self.config
        return SimpleNamespace(image_threshold=c.image_threshold, pixel_threshold=c.pixel_threshold,
                               validation_stats=c.validation_stats, evidence=c.evidence)

    def load_engine(self) -> Engine:
        """The compiled graph, compiled (seconds) on the first call; later calls return it."""
        if self._engine is None:
            self._engine = Engine(self.directory, self.manifest)
            if self._engine.format == "openvino" and self.config.scorer == "knn":
                self._search = [BankSearch(self.arrays[f"view{i}.bank"]) for i in range(len(self.views))]
        return self._engine

    # -- the pipeline ---------------------------------------------------------------------------
    def _prepare(self, indexed: tuple[int, ImageLike]) -> _Prepared | tuple[str, str]:
        index, image = indexed
        source = describe(image, index)
        try:
            rgb = load_rgb(image, max_aspect=None if self.config.tile_size else self.config.max_aspect_ratio)
        except ImageReadError as exc:
            return source, str(exc)
        patch = self.manifest["backbone"]["patch_size"]
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
            for start in range(0, len(jobs), self.config.batch_size):
                chunk = jobs[start : start + self.config.batch_size]
                out = engine(np.stack([crop for *_, crop in chunk]))
                for (index, top, left, crop), feats in zip(chunk, out):
                    h, w = crop.shape[1] // patch, crop.shape[2] // patch
                    grids[index][top : top + h, left : left + w] += feats.reshape(h, w, -1)
        for grid, (_, pieces) in zip(grids, views):
            if len(pieces) > 1:  # the normalised mean of unit vectors, per block (as extraction._Stitch)
                blocks = grid.reshape(*grid.shape[:2], -1, engine.hidden_size)
                blocks /= np.maximum(np.linalg.norm(blocks, axis=-1, keepdims=True), 1e-12)
        return grids

    def _score(self, view: int, features: np.ndarray) -> np.ndarray:
        a, prefix = self.arrays, f"view{view}."
        if self._search:
            flat = self._search[view](features)
        elif self.config.scorer == "knn":
            flat = knn_distance(features, a[prefix + "bank"])
        else:
            flat = mahalanobis_distance(features, a[prefix + "mean"], a[prefix + "whitener"])
        return flat.reshape(features.shape[:2])

    def _predict_batch(self, items: list[_Prepared], decide: bool) -> list[Prediction]:
        """Predictions of several decoded images, their backbone work batched (`_features`)."""
        per_view = [self._features([item.views[v] for item in items]) for v in range(len(self.views))]
        return [self._finish(item, [grids[k] for grids in per_view], decide) for k, item in enumerate(items)]

    def _finish(self, item: _Prepared, features: list[np.ndarray], decide: bool) -> Prediction:
        """Scores, fused map and verdict of one image from each view's features."""
        c = self.config
        grids = [self._score(view, f) for view, f in enumerate(features)]
        grid = fuse_views(grids, c.view_stats) if len(grids) > 1 else grids[0]
        if c.foreground_stats.get("active") and "foreground.mean" in self.arrays:
            mask = foreground_mask(features[-1], self.arrays["foreground.mean"], self.arrays["foreground.component"],
                                   float(self.arrays["foreground.threshold"][0]))
            grid = suppress_background(grid, mask)
        processed = item.views[-1][0]
        amap = anomaly_map(grid, processed, item.image_shape, c.sigma)
        pred = Prediction(source=item.source, score=self._image_score(grid, features[-1]), anomaly_map=amap)
        if decide:
            pred.is_anomalous = bool(pred.score > c.image_threshold)
            pred.mask = model_mask(amap, c, c, pred.is_anomalous)  # the config holds the thresholds too
        return pred

    def _image_score(self, grid: np.ndarray, features: np.ndarray) -> float:
        """The image score as the pipeline makes it: patch evidence, plus global evidence if the model uses it
        (bundles exported before image evidence score "patch", `BUNDLE_DEFAULTS`)."""
        c = self.config
        distance = None
        if c.image_evidence != "patch":
            blocks = len(self.manifest["backbone"]["layers"])
            distance = global_distance(image_embedding(features, blocks), self.arrays["global.embeddings"])
        return fuse_image_evidence(image_score(grid, c.top_percent), distance, c.image_stats, c.image_evidence)

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
            if len(pending) >= self.config.batch_size:
                yield from flush()
        yield from flush()
        bar.close()

    def predict(self, images: Sequence[ImageLike], progress: bool = True) -> list[Prediction]:
        return list(self.predict_iter(images, "predict" if progress else None))

    def features(self, images: Sequence[ImageLike]) -> Iterator[SimpleNamespace]:
        """The reference view's `(h, w, C)` features per image, or its `error` (for the evaluation's PCA picture)."""
        for item in prefetch(self._prepare, enumerate(images)):
            if isinstance(item, tuple):
                yield SimpleNamespace(source=item[0], error=item[1])
            else:
                yield SimpleNamespace(source=item.source, features=self._features([item.views[-1]])[0])

