"""What operators see: JSON access logs with a request id, one-line disconnects, Prometheus metrics.

* Every request gets an id — the client's `X-Request-ID` when it is a short token, else a fresh one —
  returned in the `X-Request-ID` response header and written in its access-log line, so a client's
  complaint can be matched to the server's log.
* Logs are one JSON object per line (`logger anomalyvfm.access` and `anomalyvfm.error`), which log
  shippers parse without rules. A client that goes away mid-request is one `client_disconnected` line,
  not the traceback Starlette would otherwise leave to uvicorn.
* `/metrics` (Prometheus text format) needs the optional `prometheus-client` package
  (`pip install 'anomalyvfm[serve]'`); without it the endpoint answers 501 and the rest works unchanged.
  Metrics live in a registry of their own, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from typing import Any, Callable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # accepted from the client as is; anything else is replaced
access_log = logging.getLogger("anomalyvfm.access")
error_log = logging.getLogger("anomalyvfm.error")


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (it may be replaced after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the service's own loggers (uvicorn's access log is switched off instead)."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    for logger in (access_log, error_log):
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class Metrics:
    """Prometheus collectors of one app, or a stand-in that records nothing when the package is missing."""

    def __init__(self, queue_depth: Callable[[], float], inflight_pixels: Callable[[], float]) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            self.registry = None
            return
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("anomalyvfm_requests_total", "HTTP requests answered", ["method", "route", "status"],
                                     registry=r)
        self.latency = prom.Histogram("anomalyvfm_request_duration_seconds", "time from request to response",
                                      ["route"], registry=r,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = prom.Histogram("anomalyvfm_batch_size", "images per backbone batch", registry=r,
                                         buckets=(1, 2, 4, 8, 16, 32, 64))
        self.images = prom.Counter("anomalyvfm_images_scored_total", "images scored", registry=r)
        self.anomalies = prom.Counter("anomalyvfm_anomalies_total", "images scored as anomalous", registry=r)
        self.rejected = prom.Counter("anomalyvfm_rejected_total", "requests refused for load (503) by reason",
                                     ["reason"], registry=r)
        prom.Gauge("anomalyvfm_queue_depth", "images waiting for the inference thread",
                   registry=r).set_function(queue_depth)
        prom.Gauge("anomalyvfm_inflight_pixels", "decoded pixels held by requests", registry=r).set_function(inflight_pixels)

    @property
    def enabled(self) -> bool:
        return self.registry is not None

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        if self.enabled:
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(route).observe(seconds)

    def batch(self, size: int) -> None:
        if self.enabled:
            self.batch_size.observe(size)

    def scored(self, anomalous: bool) -> None:
        if self.enabled:
            self.images.inc()
            if anomalous:
                self.anomalies.inc()

    def reject(self, reason: str) -> None:
        if self.enabled:
            self.rejected.labels(reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format and its content type."""
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST


class RequestLog:
    """ASGI middleware: request id, one JSON access line per request, metrics, one-line disconnects.

    Starlette places it inside its own error middleware, so it also turns any unexpected exception into
    the 500 answer (one line to the client, one log entry with the traceback) instead of letting the
    exception reach uvicorn, which would log it a second time.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if CLIENT_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        event, error = "request", None
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            event = "client_disconnected"
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown deadline passed: this request is cut short
            event = "cancelled_at_shutdown"
            if not status:
                await self._send_json(send_with_id, 503, "server is shutting down; retry on another instance")
        except Exception as exc:  # a bug: answer 500 in one line, log it once here with its traceback
            event, error = "internal_error", exc
            if not status:
                await self._send_json(send_with_id, 500, f"internal error: {type(exc).__name__} (see server log)")
        seconds = time.perf_counter() - start
        route = getattr(scope.get("route"), "path", "unmatched")
        fields = {"event": event, "request_id": request_id, "method": scope["method"], "path": scope["path"],
                  "status": status or None, "duration_ms": round(seconds * 1000, 2),
                  "client": ":".join(map(str, scope.get("client") or ()))}
        if event == "client_disconnected":
            access_log.info("client disconnected before the response", extra={"fields": fields})
        elif event == "cancelled_at_shutdown":
            access_log.warning("request cancelled: shutdown deadline passed", extra={"fields": fields})
        elif error is not None:
            error_log.error(f"internal error: {type(error).__name__}", exc_info=error, extra={"fields": fields})
        else:
            access_log.info(f"{scope['method']} {scope['path']} {status}", extra={"fields": fields})
        self.metrics.request(scope["method"], route, status or 499, seconds)

    @staticmethod
    async def _send_json(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
