"""Helpers shared by the service tests: a real uvicorn server on a loopback port, PNG bytes, free ports."""
from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import uvicorn
from PIL import Image

from anomalyvfm.service.limits import ServiceLimits
from anomalyvfm.service.server import server_config


MAX_PIXELS, MAX_BYTES, MAX_FILES = 100_000, 200_000, 4  # small limits, so the tests can cross them cheaply
LIMITS = ServiceLimits(max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES, max_files=MAX_FILES)


def close(a: float, b: float) -> bool:
    """Scores equal up to float32 noise (server and test compute them in different batches)."""
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(app, limits: ServiceLimits | None = None) -> Iterator[str]:
    """Run `app` under uvicorn (as `serve` configures it) in a thread on a kernel-chosen loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, limits or ServiceLimits(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until_serving(process, base: str, seconds: float = 60) -> None:
    """Poll `base`/health until a `serve` subprocess answers (failing if it exits or takes too long)."""
    import requests

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
        try:
            requests.get(base + "/health", timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):  # a busy machine: accepted, not yet answered
            time.sleep(0.2)
