"""Helpers shared by the service tests: a real uvicorn server on a loopback port, PNG bytes, free ports, and
waiting for a state of the server (never for a fixed time) before the next step of a test."""
from __future__ import annotations

import asyncio
import io
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import uvicorn
from PIL import Image

from anomalyvfm.service.limits import ServiceLimits
from anomalyvfm.service.server import server_config


MAX_PIXELS, MAX_BYTES, MAX_FILES = 100_000, 200_000, 4  # small limits, so the tests can cross them cheaply
LIMITS = ServiceLimits(max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES, max_files=MAX_FILES)
HANG_GUARD_S = 120  # only a hung server takes this long to reach a state a test waits for


def _unmet(condition: Callable[[], bool], what: str) -> Iterator[None]:
    """One step per check of `condition` that fails; a failed test naming `what` once the hang guard is passed."""
    guard = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < guard, f"hung: {what} did not happen within {HANG_GUARD_S} s"
        yield


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Return once `condition()` holds. What happens next in a test is ordered by this state, not by a sleep
    that a busy machine can outlast; the guard only turns a hang into a failure that names `what`."""
    for _ in _unmet(condition, what):
        time.sleep(0.01)


async def until(condition: Callable[[], bool], what: str) -> None:
    """`wait_for` inside an event loop: yields to the loop between checks, so its tasks can get there."""
    for _ in _unmet(condition, what):
        await asyncio.sleep(0.01)


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
    wait_for(lambda: server.started or not thread.is_alive(), "uvicorn starting")
    assert server.started, "server did not start"
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


SRC = str(Path(__file__).resolve().parents[1] / "src")


def serve_process(model, port: int, *options: str):
    """`anomalyvfm serve` in a real subprocess on `port`, and a queue of its output lines (read by a thread)."""
    process = subprocess.Popen([sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", str(model),
                                "--port", str(port), *options], env={**os.environ, "PYTHONPATH": SRC},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def wait_for_line(lines: "queue.Queue[str]", seen: list[str], needle: str) -> str:
    """The first output line holding `needle` (a marker the server writes; never a fixed sleep); the hang
    guard only turns a server that never writes it into a failure."""
    while True:
        line = lines.get(timeout=HANG_GUARD_S)
        seen.append(line)
        if needle in line:
            return line
