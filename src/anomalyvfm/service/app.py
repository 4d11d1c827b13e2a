"""HTTP inspection service: `anomalyvfm serve --model DIR`, then `POST /predict` an image for its verdict.

A production line posts one camera frame at a time and wants the verdict in milliseconds, so the model is
loaded once at start-up and stays warm. The design choices that matter:

* **One inference thread.** Every torch call runs on a single worker thread fed by a queue. Images that
  arrive while it is busy wait and are then scored together as one backbone batch (up to the model's
  `batch_size`). The detector is never called concurrently, and under load a GPU still sees full batches.
  Reading, decoding and validating uploads and encoding PNG maps happen in request threads, outside the
  worker, so a slow client or a large PNG never holds up inference.
* **Uploads stay in memory.** Starlette spools uploaded files over 1 MB to a temporary file; here the
  spool limit is raised to the request-size limit (and the body stream is cut at that limit), so nothing
  from a request is written to disk and nothing larger than the limit is buffered.
* **Errors are one line** — `{"detail": "..."}` — with a status that says what to fix: 400 malformed
  request, 401 API key, 413 over a size limit, 415 not an image upload, 422 not a decodable image.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import queue
import socket
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from anomalyvfm import __version__
from anomalyvfm.data.images import load_rgb
from anomalyvfm.deploy.load import load_predictor
from anomalyvfm.prediction import Prediction
from anomalyvfm.errors import ImageReadError, ImageTooLargeError, UserInputError
from anomalyvfm.service.limits import (API_KEY_HEADER, DEFAULT_MAX_BYTES, DEFAULT_MAX_CONNECTIONS,
                                     DEFAULT_MAX_FILES, DEFAULT_MAX_PIXELS)
from anomalyvfm.maps.render import display_range, heatmap, mask_image

PART_OVERHEAD = 16 * 1024  # multipart headers and boundaries allowed per file on top of its bytes
IMAGE_TYPES = ("image/", "application/octet-stream")

MapPNG = Annotated[str | None, Field(description="with ?maps=true: base64 PNG (jet) at the image's size; blue is "
                                                 "the validation mean, red twice the pixel threshold's distance above")]
MaskPNG = Annotated[str | None, Field(description="with ?maps=true: base64 PNG, 255 where the pixel score is above "
                                                  "the pixel threshold, else 0")]


class PredictResponse(BaseModel):
    score: float = Field(description="image anomaly score: mean of the highest top_percent % patch scores")
    is_anomalous: bool = Field(description="score > threshold")
    threshold: float = Field(description="the model's image threshold (validation mean + threshold_sigma std)")
    model: str = Field(description="model directory name")
    elapsed_ms: float = Field(description="server time for the request: upload, decode, queue, inference, maps")
    anomaly_map_png: MapPNG = None
    mask_png: MaskPNG = None


class BatchItem(BaseModel):
    filename: str
    status: int = Field(description="200, or the status /predict would have answered for this file alone")
    score: float | None = None
    is_anomalous: bool | None = None
    error: str | None = Field(None, description="why this file was not scored")
    anomaly_map_png: MapPNG = None
    mask_png: MaskPNG = None


class BatchResponse(BaseModel):
    model: str
    threshold: float
    results: list[BatchItem] = Field(description="one per uploaded file, in upload order")
    elapsed_ms: float


class Limits(BaseModel):
    max_pixels: int
    max_bytes: int
    max_files: int


class ModelInfo(BaseModel):
    model: str
    backbone: str
    layers: list[int]
    image_size: int
    scorer: str
    top_percent: float
    sigma: float
    threshold_sigma: float
    image_threshold: float
    pixel_threshold: float
    validation_stats: dict[str, int | float]
    device: str
    precision: str
    batch_size: int
    fitted_with_version: str = Field(description="anomalyvfm version that fitted the model")
    package_version: str = Field(description="anomalyvfm version serving it")
    limits: Limits


class Health(BaseModel):
    status: Literal["ok"]


class ErrorResponse(BaseModel):
    detail: str


class InferenceWorker:
    """The single thread that calls the detector; requests queued while it works become its next batch."""

    def __init__(self, detector) -> None:  # an AnomalyDetector or an exported BundlePredictor
        self.detector = detector
        self._jobs: queue.SimpleQueue[tuple[np.ndarray, Future[Prediction]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="anomalyvfm-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    async def predict(self, image: np.ndarray) -> Prediction:
        future: Future[Prediction] = Future()
        self._jobs.put((image, future))
        return await asyncio.wrap_future(future)

    def _next_batch(self) -> list[tuple[np.ndarray, Future[Prediction]]] | None:
        """Block for one job, then take whatever else is already waiting; None once asked to stop."""
        job = self._jobs.get()
        if job is None:
            return None
        batch = [job]
        while len(batch) < self.detector.config.batch_size:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)  # finish this batch, stop on the next call
                break
            batch.append(job)
        # Requests whose client went away were cancelled; skip them rather than score for nobody.
        return [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                preds = self.detector.predict_iter([image for image, _ in batch], progress=None)
                for (_, future), pred in zip(batch, preds, strict=True):
                    future.set_result(pred)
            except Exception as exc:  # fail this batch's requests, keep serving the next ones
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


class Service:
    """A loaded detector plus the limits and steps every request goes through."""

    def __init__(self, model_dir: str | Path, max_pixels: int, max_bytes: int, max_files: int, **overrides: Any) -> None:
        if not 1 <= max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels):
            raise UserInputError(f"--max-pixels must be between 1 and PIL's decompression-bomb limit "
                                 f"{Image.MAX_IMAGE_PIXELS}, got {max_pixels}")
        if max_bytes < 1 or max_files < 1:
            raise UserInputError(f"--max-bytes and --max-files must be at least 1, got {max_bytes} and {max_files}")
        self.detector = load_predictor(model_dir, **overrides)
        self.detector.backbone  # load the weights now: the first request should not pay for it
        self.name = Path(model_dir).resolve().name
        self.limits = Limits(max_pixels=max_pixels, max_bytes=max_bytes, max_files=max_files)
        config = self.detector.config
        self.threshold = float(config.image_threshold)
        self.display = display_range(config.validation_stats["pixel_score_mean"], config.pixel_threshold)
        self.worker = InferenceWorker(self.detector)

    async def read_uploads(self, request: Request, field: str, max_files: int) -> list[UploadFile]:
        """The files posted in multipart `field`, parsed in memory with the body cut at the size limit."""
        content_type = request.headers.get("content-type")
        if not content_type:
            raise HTTPException(400, f"no image sent: post it as multipart/form-data in field '{field}'")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            raise HTTPException(415, f"content type {content_type} is not multipart/form-data "
                                     f"(post the image in field '{field}')")
        limit = max_files * (self.limits.max_bytes + PART_OVERHEAD)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body of {declared} bytes is over the limit of {limit}")

        async def body() -> AsyncIterator[bytes]:
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
                yield chunk

        parser = MultiPartParser(request.headers, body(), max_files=max_files, max_fields=16)
        parser.spool_max_size = limit  # never roll over to a temporary file: the body stops at `limit`
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"multipart body refused: {exc.message}") from None
        values = form.getlist(field)
        if not values:
            raise HTTPException(400, f"no file in multipart field '{field}'")
        if not all(isinstance(value, UploadFile) for value in values):
            raise HTTPException(400, f"multipart field '{field}' must be a file upload, not text")
        return values

    async def decode(self, upload: UploadFile) -> np.ndarray:
        name = upload.filename or "upload"
        if upload.content_type and not upload.content_type.lower().startswith(IMAGE_TYPES):
            raise HTTPException(415, f"{name}: content type {upload.content_type} is not an image")
        if upload.size is not None and upload.size > self.limits.max_bytes:
            raise HTTPException(413, f"{name}: {upload.size} bytes is over the limit of {self.limits.max_bytes}")
        data = await upload.read()
        if not data:
            raise HTTPException(400, f"{name}: file is empty")
        try:
            return await run_in_threadpool(load_rgb, data, self.limits.max_pixels)
        except ImageTooLargeError as exc:
            raise HTTPException(413, f"{name}: {exc}") from None
        except ImageReadError as exc:
            raise HTTPException(422, f"{name}: {exc}") from None

    def maps(self, pred: Prediction) -> dict[str, str]:
        return {"anomaly_map_png": png_base64(heatmap(pred.anomaly_map, *self.display)),
                "mask_png": png_base64(mask_image(pred.mask))}

    async def score(self, upload: UploadFile, with_maps: bool) -> dict[str, Any]:
        """Fields of one scored upload; raises `HTTPException` if it is not a usable image."""
        pred = await self.worker.predict(await self.decode(upload))
        result: dict[str, Any] = {"score": pred.score, "is_anomalous": pred.is_anomalous}
        if with_maps:
            result |= await run_in_threadpool(self.maps, pred)
        return result

    def info(self) -> ModelInfo:
        c = self.detector.config
        return ModelInfo(
            model=self.name, backbone=c.backbone, layers=list(c.layers), image_size=c.image_size, scorer=c.scorer,
            top_percent=c.top_percent, sigma=c.sigma, threshold_sigma=c.threshold_sigma,
            image_threshold=c.image_threshold, pixel_threshold=c.pixel_threshold, validation_stats=c.validation_stats,
            device=c.device, precision=c.precision, batch_size=c.batch_size, fitted_with_version=c.version,
            package_version=__version__, limits=self.limits,
        )


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


def create_app(
    model_dir: str | Path,
    api_key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    **overrides: Any,
) -> FastAPI:
    """Load the model now (a bad model directory raises `UserInputError` before anything listens).

    `overrides` go to `load_predictor` (device, batch_size, precision); `model_dir` may be an exported bundle. With `api_key`, every endpoint
    but `/health` needs it in `X-API-Key`; `/health` stays open for load balancers and orchestrators, and
    `/docs` and `/openapi.json` stay open because they describe the API without exposing model or data.
    """
    service = Service(model_dir, max_pixels, max_bytes, max_files, **overrides)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        service.worker.stop()

    app = FastAPI(title="AnomalyVFM inspection service", version=__version__, lifespan=lifespan,
                  description="Score images of parts with a fitted AnomalyVFM model. Every error is "
                              '`{"detail": "<one line>"}`.')
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422)}
    if api_key:
        errors[401] = {"model": ErrorResponse}
    maps_query = Query(False, description="also return the anomaly heat map and the defect mask as base64 PNGs")
    router = APIRouter(dependencies=[require_api_key(api_key)] if api_key else [], responses=errors)

    @router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
                 summary="Score one image", openapi_extra=upload_body("file", many=False))
    async def predict(request: Request, maps: bool = maps_query) -> dict[str, Any]:
        """Upload one image in multipart field `file`; get its anomaly score and pass/fail decision."""
        start = time.perf_counter()
        (upload,) = await service.read_uploads(request, "file", max_files=1)
        result = await service.score(upload, maps)
        return {**result, "threshold": service.threshold, "model": service.name, "elapsed_ms": elapsed_ms(start)}

    @router.post("/predict/batch", response_model=BatchResponse, response_model_exclude_none=True,
                 summary="Score several images", openapi_extra=upload_body("files", many=True))
    async def predict_batch(request: Request, maps: bool = maps_query) -> dict[str, Any]:
        """Upload images in multipart field `files` (repeated). A file that cannot be scored gets `error` and
        the status `/predict` would have given it; the others are still scored and the response is 200."""
        start = time.perf_counter()
        uploads = await service.read_uploads(request, "files", max_files=service.limits.max_files)

        async def item(upload: UploadFile) -> dict[str, Any]:
            name = upload.filename or "upload"
            try:
                return {"filename": name, "status": 200, **await service.score(upload, maps)}
            except HTTPException as exc:
                return {"filename": name, "status": exc.status_code, "error": exc.detail}

        results = await asyncio.gather(*(item(upload) for upload in uploads))
        return {"model": service.name, "threshold": service.threshold, "results": results,
                "elapsed_ms": elapsed_ms(start)}

    @router.get("/model", response_model=ModelInfo, summary="Model configuration, thresholds and limits")
    async def model_info() -> ModelInfo:
        return service.info()

    @app.get("/health", response_model=Health, summary="Liveness check (never needs the API key)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__} (see server log)"}, status_code=500)

    return app


def run_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    **overrides: Any,
) -> None:
    """Take the port, load the model, then serve until interrupted (Ctrl-C or SIGTERM shut down gracefully).

    The port is bound before the model loads, so a port already in use is reported at once, in one line.
    """
    sock = listening_socket(host, port)
    app = create_app(model_dir, api_key, max_pixels, max_bytes, max_files, **overrides)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, limit_concurrency=DEFAULT_MAX_CONNECTIONS))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; that shutdown is a success
        pass


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); a `UserInputError` naming the address when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
