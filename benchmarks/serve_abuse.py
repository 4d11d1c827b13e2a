"""Replay the abusive cases of the reliability issue against `anomalyvfm serve` and print a pass/fail table.

    python benchmarks/serve_abuse.py --model models/CAT [--images path/to/good/images] [--load-seconds 30]

Starts `anomalyvfm serve` with its default limits on a free loopback port (a second, short-lived one for the
shutdown cases) and tries, as an adversarial client would: tiny images with extreme aspect ratios, a
decompression bomb, a poisoned image batched with innocent ones, floods past the queue, 63 stalled uploads,
64 connections with unfinished headers, client disconnects, SIGTERM with stalled and in-flight requests, CLI
mistakes. Then the goal figures: other clients' p99 latency while poison images are rejected (against the
same clients unloaded) and sustained load from 16 clients (5xx count, answers that differ from the same
image's answer when sent alone). Everything is bounded in count and time and stays on loopback.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Callable

import numpy as np
import requests
from PIL import Image

from serve_load import free_port, wait_healthy

SRC = str(Path(__file__).resolve().parents[1] / "src")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 30_000) -> bytes:
    """A ~100-byte PNG whose header claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def start(model: str, log: IO[bytes], *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", model, "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": SRC})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=180)
    except RuntimeError as exc:
        log.seek(0)
        raise SystemExit(f"serve_abuse: {exc}: {log.read().decode(errors='replace')[-2000:]}") from None
    return process, url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


STALLED_UPLOAD = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                  b"filename=\"x.png\"\r\n\r\n" + bytes(1000))
UNFINISHED_HEADERS = b"POST /predict HTTP/1.1\r\nHost: x\r\n"


class Abuse:
    def __init__(self, url: str, good: list[bytes], log: IO[bytes]) -> None:
        self.url, self.good, self.log = url, good, log
        self.session = requests.Session()

    def post(self, data: bytes, name: str = "x.png", path: str = "/predict", **kwargs) -> requests.Response:
        return requests.post(self.url + path, files={"file": (name, data, "image/png")}, timeout=180, **kwargs)

    def status(self, data: bytes, want: int, seconds: float) -> tuple[bool, str]:
        start = time.perf_counter()
        response = self.post(data)
        took = time.perf_counter() - start
        return response.status_code == want and took < seconds, f"{response.status_code} in {took:.2f}s"

    def poison_batched_with_innocents(self) -> tuple[bool, str]:
        needle = png(np.zeros((1, 40_000, 3), np.uint8))
        bodies = [self.good[i % len(self.good)] for i in range(3)] + [needle]
        with ThreadPoolExecutor(4) as pool:
            statuses = [r.status_code for r in pool.map(self.post, bodies)]
        return statuses == [200, 200, 200, 422], f"statuses {statuses}"

    def flood(self) -> tuple[bool, str]:
        """200 requests from 100 threads at once: only 200 or 503 (with Retry-After), never 500."""
        def one(i: int) -> tuple[int, str | None]:
            response = self.post(self.good[i % len(self.good)])
            return response.status_code, response.headers.get("Retry-After")

        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(one, range(200)))
        codes = sorted({code for code, _ in results})
        ok = set(codes) <= {200, 503} and all(retry for code, retry in results if code == 503)
        return ok, f"{sum(c == 200 for c, _ in results)} x 200, {sum(c == 503 for c, _ in results)} x 503, codes {codes}"

    def slow_clients(self, payload: bytes, count: int) -> tuple[bool, str]:
        sockets = []
        try:
            for _ in range(count):
                sock = connect(self.url)
                sock.sendall(payload)
                sockets.append(sock)
            start = time.perf_counter()
            health = requests.get(self.url + "/health", timeout=10).status_code
            ready = requests.get(self.url + "/health/ready", timeout=10).status_code
            scored = self.post(self.good[0]).status_code
            took = time.perf_counter() - start
        finally:
            for sock in sockets:
                sock.close()
        return (health, ready, scored) == (200, 200, 200) and took < 5, \
            f"/health {health}, /health/ready {ready}, /predict {scored} in {took:.2f}s"

    def header_timeout_closes(self) -> tuple[bool, str]:
        sock = connect(self.url)
        sock.settimeout(30)
        sock.sendall(UNFINISHED_HEADERS)
        start = time.perf_counter()
        closed = sock.recv(100) == b""
        sock.close()
        took = time.perf_counter() - start
        return closed and took < 15, f"closed after {took:.1f}s (limit 10 s)"

    def disconnect_logged_in_one_line(self) -> tuple[bool, str]:
        before = self.log_text()
        sock = connect(self.url)
        sock.sendall(STALLED_UPLOAD)
        time.sleep(0.3)
        sock.close()
        time.sleep(1.0)
        new = self.log_text()[len(before):]
        lines = [line for line in new.splitlines() if "client_disconnected" in line]
        return len(lines) == 1 and "Traceback" not in new, f"{len(lines)} disconnect line(s), " \
                                                           f"{new.count('Traceback')} tracebacks"

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        self.log.seek(0, io.SEEK_END)
        return text

    def docs_offline(self) -> tuple[bool, str]:
        page = requests.get(self.url + "/docs", timeout=10).text
        asset = requests.get(self.url + "/docs/assets/swagger-ui-bundle.js", timeout=10).status_code
        local = "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
        return local and asset == 200, f"local assets {local}, bundle {asset}"

    def latency_under_poison(self, seconds: float) -> tuple[bool, str]:
        """p99 latency of 4 clients' ordinary requests, alone and while one client sends poison images."""
        poisons = [png(np.zeros((1, 40_000, 3), np.uint8)), png(np.zeros((1, 20, 3), np.uint8)), bomb_png()]

        def clients(stop: float) -> list[float]:
            def run(i: int) -> list[float]:
                session, times = requests.Session(), []
                while time.monotonic() < stop:
                    start = time.perf_counter()
                    response = session.post(self.url + "/predict", files={"file": self.good[i % len(self.good)]},
                                            timeout=180)
                    if response.status_code == 200:
                        times.append(time.perf_counter() - start)
                return times

            with ThreadPoolExecutor(4) as pool:
                return [t for times in pool.map(run, range(4)) for t in times]

        alone = clients(time.monotonic() + seconds)
        stop, rejected = time.monotonic() + seconds, []

        def poison() -> None:
            while time.monotonic() < stop:
                rejected.append(self.post(poisons[len(rejected) % 3]).status_code)

        thread = threading.Thread(target=poison)
        thread.start()
        loaded = clients(stop)
        thread.join()
        p99_alone, p99_loaded = np.percentile(alone, 99) * 1000, np.percentile(loaded, 99) * 1000
        ok = p99_loaded <= 2 * p99_alone and set(rejected) <= {413, 422}
        return ok, (f"p99 {p99_alone:.0f} ms alone, {p99_loaded:.0f} ms with {len(rejected)} poison requests "
                    f"({sorted(set(rejected))}), ratio {p99_loaded / p99_alone:.2f}")

    def sustained(self, seconds: float) -> tuple[bool, str]:
        """16 clients for `seconds`: every answer must be 200 and equal to the same image's answer alone."""
        truth = [self.post(body).json()["score"] for body in self.good]
        stop, results = time.monotonic() + seconds, []

        def run(i: int) -> list[tuple[int, int, float | None]]:
            session, out, k = requests.Session(), [], i
            while time.monotonic() < stop:
                index = k % len(self.good)
                response = session.post(self.url + "/predict", files={"file": self.good[index]}, timeout=180)
                out.append((index, response.status_code, response.json().get("score") if response.ok else None))
                k += 1
            return out

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            for part in pool.map(run, range(16)):
                results += part
        wall = time.perf_counter() - start
        errors = sum(status >= 500 for _, status, _ in results)
        wrong = sum(status == 200 and abs(score - truth[i]) > 1e-5 * max(1, abs(truth[i])) for i, status, score in results)
        other = sum(status not in (200,) and status < 500 for _, status, _ in results)
        return errors == 0 and wrong == 0 and other == 0, \
            f"{len(results)} requests, {len(results) / wall:.1f} req/s, {errors} x 5xx, {other} other non-200, " \
            f"{wrong} wrong answers"


def shutdown_cases(model: str, good: bytes) -> list[tuple[str, bool, str]]:
    rows = []
    with tempfile.TemporaryFile() as log:
        process, url = start(model, log, "--shutdown-timeout", "5")
        stalled = connect(url)
        stalled.sendall(STALLED_UPLOAD)
        time.sleep(0.3)
        start_time = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        took = time.perf_counter() - start_time
        stalled.close()
        rows.append(("SIGTERM with a stalled upload", took < 10, f"exited in {took:.1f}s (deadline 5 s)"))

    with tempfile.TemporaryFile() as log:
        process, url = start(model, log, "--shutdown-timeout", "30")
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(requests.post, url + "/predict", files={"file": good}, timeout=120) for _ in range(32)]
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            statuses = []
            for future in futures:
                try:
                    statuses.append(future.result().status_code)
                except requests.RequestException:
                    statuses.append(0)
        process.wait(60)
        answered = sum(s == 200 for s in statuses)
        refused = sum(s in (0, 503) for s in statuses)  # sent after the listener closed: refused, never half-done
        rows.append(("SIGTERM drains in-flight requests", answered + refused == 32 and answered > 0,
                     f"{answered} answered 200, {refused} refused at the closed listener, {32 - answered - refused} other"))
    return rows


def cli_cases(model: str) -> list[tuple[str, bool, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bad_model = Path(tmp) / "empty"
        bad_model.mkdir()
        for name, argv, fragment in [
            ("serve --port 99999", ["serve", "--model", model, "--port", "99999"], "--port"),
            ("serve a bad model", ["serve", "--model", str(bad_model), "--port", str(free_port())], "model"),
        ]:
            result = subprocess.run([sys.executable, "-m", "anomalyvfm.cli.main", *argv], capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": SRC}, timeout=120)
            lines = result.stderr.strip().splitlines()
            rows.append((name, result.returncode == 2 and len(lines) == 1 and fragment in result.stderr,
                         f"exit {result.returncode}, {len(lines)} stderr line(s)"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory to serve")
    parser.add_argument("--images", help="folder of good images to post (default: generated 448x448 textures)")
    parser.add_argument("--load-seconds", type=float, default=20, help="length of each latency/load phase (max 120)")
    args = parser.parse_args()
    seconds = min(args.load_seconds, 120)
    if args.images:
        good = [path.read_bytes() for path in sorted(Path(args.images).glob("*.png"))[:8]]
    else:
        from anomalyvfm.demo import textured_image

        rng = np.random.default_rng(0)
        good = [png(textured_image(rng, 448, 448)) for _ in range(8)]

    rows: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryFile() as log:
        process, url = start(args.model, log)
        abuse = Abuse(url, good, log)
        try:
            cases: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
                ("1x20 px PNG (72 bytes)", lambda: abuse.status(png(np.zeros((1, 20, 3), np.uint8)), 422, 2)),
                ("1x40000 px PNG (198 bytes)", lambda: abuse.status(png(np.zeros((1, 40_000, 3), np.uint8)), 422, 2)),
                ("decompression bomb (30000^2 header)", lambda: abuse.status(bomb_png(), 413, 2)),
                ("poison batched with 3 innocent clients", abuse.poison_batched_with_innocents),
                ("flood: 200 requests from 100 threads", abuse.flood),
                ("63 stalled uploads", lambda: abuse.slow_clients(STALLED_UPLOAD, 63)),
                ("64 unfinished headers", lambda: abuse.slow_clients(UNFINISHED_HEADERS, 64)),
                ("unfinished headers closed by timeout", abuse.header_timeout_closes),
                ("client disconnect mid-upload", abuse.disconnect_logged_in_one_line),
                ("/docs offline", abuse.docs_offline),
            ]
            for name, case in cases:
                try:
                    rows.append((name, *case()))
                except Exception as exc:  # a case that crashes the client side is a failure, not an abort
                    rows.append((name, False, f"{type(exc).__name__}: {exc}"))
            rows.append(("other clients' p99 while poison is rejected", *abuse.latency_under_poison(seconds)))
            rows.append(("16 clients sustained", *abuse.sustained(seconds)))
            alive = process.poll() is None and requests.get(url + "/health", timeout=10).ok
            rows.append(("server still healthy after all of the above", alive, ""))
        finally:
            process.terminate()
            process.wait(60)
    rows += shutdown_cases(args.model, good[0])
    rows += cli_cases(args.model)

    width = max(len(name) for name, *_ in rows)
    print(f"| {'case'.ljust(width)} | result | observed |")
    print(f"|{'-' * (width + 2)}|--------|----------|")
    for name, ok, note in rows:
        print(f"| {name.ljust(width)} | {'pass' if ok else 'FAIL'}   | {note} |")
    passed = sum(ok for _, ok, _ in rows)
    print(f"\n{passed}/{len(rows)} cases handled correctly")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
