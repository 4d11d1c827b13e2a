"""HTTP inspection service: `anomalyvfm serve --model DIR`, then `POST /predict` an image for its verdict.

A production line posts one camera frame at a time and wants the verdict in milliseconds, so the model is
loaded once at start-up and stays warm. How the parts fit:

* `worker.py` — one inference thread behind a bounded queue; one job's failure answers only that job.
* `admission.py` — server-wide budgets of decoded pixels and body bytes, so memory is bounded whatever
  is sent; `limits.py` declares every limit and timeout once (docs/serving.md explains them).
* `observability.py` — request ids, JSON access logs, Prometheus metrics; `docs.py` — offline `/docs`;
  `server.py` — uvicorn with a header timeout, connection cap and graceful-shutdown deadline.

Per request, here: the body is read in memory (never spooled to disk) within the byte budget and the body
timeout; each image's header is checked (pixels, aspect ratio) before it is decoded within the pixel
budget; PNG maps are encoded outside the worker, so a slow client or a large PNG never holds up inference.
Errors are one line — `{"detail": "..."}` — with a status that says what to do: 400 malformed request,
401 API key, 408 body too slow, 413 over a size limit, 415 not an image upload, 422 not a usable image,
500 this image could not be processed (others are unaffected), 503 busy — retry after `Retry-After`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from anomalyvfm.declare import to_dict
from anomalyvfm.data.images import check_shape, declared_size, load_rgb
from anomalyvfm.deploy.load import load_predictor
from anomalyvfm.prediction import Prediction, Predictor
from anomalyvfm.errors import ImageReadError, ImageTooLargeError, UserInputError
from anomalyvfm.maps.render import display_range, heatmap, mask_image
from anomalyvfm.service.admission import TRIM_AFTER_PIXELS, Budget, release_memory
from anomalyvfm.service.docs import mount_docs
from anomalyvfm.service.limits import API_KEY_HEADER, ServiceLimits
from anomalyvfm.service.observability import Metrics, RequestLog
from anomalyvfm.service.uploads import receive_uploads
from anomalyvfm.service.schemas import (DECLARED_NAMES, BatchResponse, ErrorResponse, Health, ModelInfo, PredictResponse,
                                        Readiness, ReloadRequest, ReloadResponse)
from anomalyvfm.service.web import mount_web
from anomalyvfm.service.worker import RETRY_AFTER, InferenceWorker, JobFailed
from anomalyvfm.store.records import verdict_record
from anomalyvfm.version import __version__

if TYPE_CHECKING:  # SQLAlchemy is imported only when a store is given (service/inspections.py)
    from anomalyvfm.store.inspections import InspectionStore

IMAGE_TYPES = ("image/", "application/octet-stream")
log = logging.getLogger("anomalyvfm.error")  # operational events (reloads) go with the server's JSON log lines


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@dataclass(frozen=True)
class Served:
    """One loaded model and what the service derives from it; a reload replaces it whole, never edits it."""

    detector: Predictor
    path: Path
    name: str
    threshold: float
    display: tuple[float, float]
    max_aspect: float | None

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any]) -> "Served":
        detector = load_predictor(path, **overrides)  # weights load now, not at the first request
        thresholds = detector.thresholds()
        tiled = detector.settings.tile_size  # tiling bounds work by pixels, not by shape
        return cls(detector, Path(path), Path(path).resolve().name, float(thresholds.image_threshold),
                   display_range(thresholds.validation_stats["pixel_score_mean"], thresholds.pixel_threshold),
                   None if tiled else detector.runtime.max_aspect_ratio)


@contextmanager
def image_errors(name: str) -> Iterator[None]:
    """An image too large (413) or unreadable (422) as the HTTP error that names the upload."""
    try:
        yield
    except ImageTooLargeError as exc:
        raise HTTPException(413, f"{name}: {exc}") from None
    except ImageReadError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None


class Service:
    """A loaded model plus the limits, budgets and steps every request goes through."""

    def __init__(self, model_dir: str | Path, limits: ServiceLimits, store: InspectionStore | None = None,
                 **overrides: Any) -> None:
        limits.validate(Image.MAX_IMAGE_PIXELS)
        self.overrides = overrides
        self.served = Served.load(model_dir, overrides)
        self.limits = limits
        self.pixels, self.body_bytes = Budget(limits.max_inflight_pixels), Budget(limits.max_inflight_bytes)
        self.metrics = Metrics(queue_depth=lambda: self.worker.depth, inflight_pixels=lambda: self.pixels.used)
        self.worker = InferenceWorker(self.served, limits.max_queue, on_batch=self.metrics.batch, keep_masks=bool(store))
        self.store, self.recorder = store, None
        self._reloading = asyncio.Lock()
        if store is not None:
            from anomalyvfm.service.inspections import recorder_for

            self.recorder = recorder_for(store, self.metrics)

    @property
    def detector(self) -> Predictor:
        return self.served.detector

    @property
    def name(self) -> str:
        return self.served.name

    async def reload(self, path: str | Path | None = None) -> dict[str, str]:
        """Load the model at `path` (default: the one served, e.g. replaced by `anomalyvfm update`) and judge
        with it from the next batch on; requests in flight finish on the old one. A model that cannot be
        loaded is logged (`reload_failed`) and raises `UserInputError`; the old one keeps serving. One at a time."""
        async with self._reloading:
            try:
                served = await run_in_threadpool(Served.load, path or self.served.path, self.overrides)
            except UserInputError as exc:
                log.error(f"reload refused, still serving {self.detector.version}: {exc}",
                          extra={"fields": {"event": "reload_failed", "error": str(exc)}})
                raise UserInputError(f"reload refused, still serving {self.detector.version}: {exc}") from None
            previous, self.served = self.served, served
            self.worker.use(served)
        log.info(f"reloaded {served.path}: model version {previous.detector.version} → {served.detector.version}",
                 extra={"fields": {"event": "reload", "model": str(served.path), "model_version": served.detector.version,
                                   "previous_version": previous.detector.version}})
        return {"model": served.name, "model_version": served.detector.version,
                "previous_version": previous.detector.version}

    def busy(self, reason: str, detail: str) -> HTTPException:
        self.metrics.reject(reason)
        return HTTPException(503, detail, headers=RETRY_AFTER)

    def uploads(self, request: Request, field: str, max_files: int):
        """The files of multipart `field`, received within this service's limits (`uploads.receive_uploads`)."""
        return receive_uploads(request, field, max_files, self.limits, self.body_bytes, self.busy)

    async def read(self, upload: UploadFile) -> bytes:
        """The upload's bytes, after the checks that need no decoding."""
        name = upload.filename or "upload"
        if upload.content_type and not upload.content_type.lower().startswith(IMAGE_TYPES):
            raise HTTPException(415, f"{name}: content type {upload.content_type} is not an image")
        if upload.size is not None and upload.size > self.limits.max_bytes:
            raise HTTPException(413, f"{name}: {upload.size} bytes is over the limit of {self.limits.max_bytes}")
        data = await upload.read()
        if not data:
            raise HTTPException(400, f"{name}: file is empty")
        return data

    @staticmethod
    def maps(pred: Prediction, display: tuple[float, float]) -> dict[str, str]:
        return {"anomaly_map_png": png_base64(heatmap(pred.anomaly_map, *display)),
                "mask_png": png_base64(mask_image(pred.mask))}

    async def score(self, upload: UploadFile, with_maps: bool, deadline: float,
                    request_id: str | None = None) -> dict[str, Any]:
        """Fields of one scored upload; raises `HTTPException` if it is not a usable image or the server is busy.

        The image's pixels are taken from the pixel budget before it is decoded and given back once its
        answer (maps included) is built, so decoded images, maps and their PNGs in flight stay within it.
        With a store, the verdict is recorded (or spilled) before it is answered.
        """
        name = upload.filename or "upload"
        data = await self.read(upload)
        with image_errors(name):
            width, height = await run_in_threadpool(declared_size, data)
            check_shape(width, height, self.limits.max_pixels, self.served.max_aspect)
        loop = asyncio.get_running_loop()
        try:
            await self.pixels.take(width * height, deadline - loop.time())
        except TimeoutError:
            raise self.busy("pixel_budget", f"server busy: {self.pixels.used} decoded pixels in flight "
                                            f"(limit {self.pixels.total}); retry shortly") from None
        try:
            with image_errors(name):
                image = await run_in_threadpool(load_rgb, data, self.limits.max_pixels, self.served.max_aspect)
            size, digest = len(data), await run_in_threadpool(self.store.keep, data) if self.store else ""
            del data
            try:
                pred, served = await self.worker.predict(image, with_maps, deadline - loop.time())
            except JobFailed as exc:
                raise HTTPException(500, f"{name}: {exc}") from None
            except HTTPException as exc:
                if exc.status_code == 503:
                    self.metrics.reject("queue")
                raise
            self.metrics.scored(pred.is_anomalous)
            if self.recorder:
                record = verdict_record(served.detector, served.name, name, digest, size, pred, request_id)
                pred.mask = pred.mask if with_maps else None
                await asyncio.wrap_future(self.recorder.submit(record))
            result: dict[str, Any] = {"score": pred.score, "is_anomalous": pred.is_anomalous,
                                      "threshold": served.threshold, "model": served.name,
                                      "model_version": served.detector.version}
            if with_maps:
                result |= await run_in_threadpool(self.maps, pred, served.display)
            return result
        finally:
            self.pixels.give(width * height)
            if release_memory and width * height >= TRIM_AFTER_PIXELS and self.pixels.used == 0:
                await run_in_threadpool(release_memory)

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.limits.request_timeout

    def info(self) -> ModelInfo:
        d, t = self.detector, self.detector.thresholds()  # a torch detector or an exported bundle
        declared = {**to_dict(d.settings), **to_dict(d.runtime), "score": d.score_mode}
        return ModelInfo(
            model=self.name, **{k: v for k, v in declared.items() if k in DECLARED_NAMES},
            image_threshold=t.image_threshold, pixel_threshold=t.pixel_threshold, validation_stats=t.validation_stats,
            threshold_evidence={level: e["text"] for level, e in (t.evidence or {}).items() if "text" in e},
            train_images=d.record.train_images, fitted_at=d.record.fitted_at,
            fitted_with_version=d.record.package_version, package_version=__version__, limits=vars(self.limits),
            store=self.store.name if self.store else None, model_version=d.version,
            updates=[{k: v for k, v in u.items() if k != "added_scores"} for u in d.record.updates],
            calibration_defects=d.record.calibration_defects, defects=d.record.defects,
            image_evidence_choice=d.record.auto_choice.get("image_evidence", {}),
        )

    def readiness(self) -> Readiness:
        ready = self.worker.alive and not self.worker.full
        store = self.recorder.status() if self.recorder else {}  # a degraded store does not make it unready
        return Readiness(status="ready" if ready else "not ready", model_loaded=True, worker_alive=self.worker.alive,
                         queue_depth=self.worker.depth, queue_capacity=self.limits.max_queue, **store)


def upload_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for a multipart upload (the body is parsed by hand, so FastAPI cannot infer it)."""
    binary = {"type": "string", "format": "binary"}
    schema = {"type": "object", "required": [field],
              "properties": {field: {"type": "array", "items": binary} if many else binary}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def require_api_key(expected: str) -> Any:
    """A dependency that answers 401 unless the `X-API-Key` header equals `expected` (constant-time)."""
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    def check(key: str | None = Depends(header)) -> None:
        if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    return Depends(check)


def prediction_routes(service: Service, api_key: str | None) -> APIRouter:
    """/predict, /predict/batch and /model: the routes that need the API key when one is set."""
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                               for code in (400, 408, 413, 415, 422, 500, 503)}
    if api_key:
        errors[401] = {"model": ErrorResponse}
    maps_query = Query(False, description="also return the anomaly heat map and the defect mask as base64 PNGs")
    router = APIRouter(dependencies=[require_api_key(api_key)] if api_key else [], responses=errors)

    @router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
                 summary="Score one image", openapi_extra=upload_body("file", many=False))
    async def predict(request: Request, maps: bool = maps_query) -> dict[str, Any]:
        """Upload one image in multipart field `file`; get its anomaly score and pass/fail decision."""
        start = time.perf_counter()
        async with service.uploads(request, "file", max_files=1) as (upload,):
            result = await service.score(upload, maps, service.deadline(), request.state.request_id)
        return {**result, "elapsed_ms": elapsed_ms(start)}

    @router.post("/predict/batch", response_model=BatchResponse, response_model_exclude_none=True,
                 summary="Score several images", openapi_extra=upload_body("files", many=True))
    async def predict_batch(request: Request, maps: bool = maps_query) -> dict[str, Any]:
        """Upload images in multipart field `files` (repeated). A file that cannot be scored gets `error` and
        the status `/predict` would have given it; the others are still scored and the response is 200."""
        start = time.perf_counter()

        async def item(upload: UploadFile, deadline: float) -> dict[str, Any]:
            name = upload.filename or "upload"
            try:  # the response model keeps a batch item's own fields (model and threshold are the batch's)
                return {"filename": name, "status": 200,
                        **await service.score(upload, maps, deadline, request.state.request_id)}
            except HTTPException as exc:
                return {"filename": name, "status": exc.status_code, "error": exc.detail}

        async with service.uploads(request, "files", max_files=service.limits.max_files) as uploads:
            deadline = service.deadline()  # one deadline for all the files, from the body's arrival
            results = await asyncio.gather(*(item(upload, deadline) for upload in uploads))
        return {"model": service.name, "threshold": service.served.threshold, "results": results,
                "elapsed_ms": elapsed_ms(start)}

    @router.get("/model", response_model=ModelInfo, summary="Model configuration, thresholds and limits")
    async def model_info() -> ModelInfo:
        return service.info()

    @router.post("/admin/reload", response_model=ReloadResponse, summary="Serve a new model version without a restart",
                 responses={422: {"model": ErrorResponse}})
    async def reload(body: ReloadRequest | None = None) -> dict[str, str]:
        """Load the model again (or `model`, another directory) and judge with it from the next batch on;
        requests in flight finish on the old version. A model that cannot be loaded is 422, and the old one
        keeps serving. SIGHUP does the same for the served directory."""
        try:
            return await service.reload(body.model if body else None)
        except UserInputError as exc:
            raise HTTPException(422, str(exc)) from None

    return router


def add_operations_routes(app: FastAPI, service: Service) -> None:
    """Health probes and Prometheus metrics: open to orchestrators and scrapers, never behind the API key."""
    @app.get("/health/live", response_model=Health, summary="Liveness: the server answers (never needs the API key)")
    @app.get("/health", response_model=Health, summary="Alias of /health/live (never needs the API key)")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}},
             summary="Readiness: model loaded, inference thread alive, queue not full (503 otherwise)")
    async def ready() -> JSONResponse:
        state = service.readiness()
        return JSONResponse(state.model_dump(), status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics (needs prometheus-client: the serve extra)",
             responses={501: {"model": ErrorResponse}})
    async def metrics() -> Response:
        if not service.metrics.enabled:
            raise HTTPException(501, "metrics need prometheus-client: pip install 'anomalyvfm[serve]'")
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)


def create_app(model_dir: str | Path, api_key: str | None = None, limits: ServiceLimits | None = None,
               store: InspectionStore | None = None, **overrides: Any) -> FastAPI:
    """Load the model now (a bad model directory raises `UserInputError` before anything listens).

    `model_dir` may be an exported bundle; `overrides` go to `load_predictor` (device, batch_size, precision, max_aspect_ratio). With
    `api_key`, every endpoint but the health checks needs it in `X-API-Key`; health stays open for load
    balancers and orchestrators, and `/docs`, `/openapi.json` and `/metrics` stay open because they
    describe the API and its load without exposing model or data. With `store` (`anomalyvfm.store.open_store`),
    every verdict is recorded and `/inspections` serves the history (`service/inspections.py`); the app
    closes the store's recorder at shutdown, the caller the store.
    """
    if api_key is not None and not api_key.strip():  # "" would otherwise mean "no authentication"
        raise UserInputError("the API key is empty: give a key, or None to serve without one")
    limits = limits or ServiceLimits()
    service = Service(model_dir, limits, store, **overrides)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        await run_in_threadpool(service.worker.stop, limits.shutdown_timeout)
        if service.recorder:
            await run_in_threadpool(service.recorder.close)

    app = FastAPI(title="AnomalyVFM inspection service", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Score images of parts with a fitted AnomalyVFM model. Every error is "
                                              '`{"detail": "<one line>"}`; limits and errors: docs/serving.md.')
    app.include_router(prediction_routes(service, api_key))
    if store is not None:
        from anomalyvfm.service.inspections import inspection_routes

        app.include_router(inspection_routes(store, [require_api_key(api_key)] if api_key else []))
    add_operations_routes(app, service)
    mount_docs(app)
    mount_web(app)
    app.state.service = service  # for the web page (service/web.py) and tests that inspect the running service

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_middleware(RequestLog, metrics=service.metrics)
    return app
