"""Peak RSS of `anomalyvfm serve` (and of `predict`) under the memory-abuse cases of the reliability issue.

    python benchmarks/serve_memory.py --model models/CAT [--side 6000] [--skip-cli]

Starts the server with its default limits on a free loopback port, samples the server process's RSS every
20 ms, and sends, one case after another: a /predict/batch of four 36 MP images with ?maps=true (a body of
about half a megabyte), four and then sixteen concurrent 36 MP /predict?maps=true, and a 100 MP image
(refused, 413). Prints each case's statuses, seconds and peak RSS, and the RSS at rest after them. Then
`anomalyvfm predict` of one 10 000 x 10 000 image with pictures, whose peak RSS is the child's maximum
resident set (getrusage). Bounded: a fixed list of requests, each with a 300 s client timeout.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from serve_load import free_port, wait_healthy

SRC = str(Path(__file__).resolve().parents[1] / "src")
MB = 1024 * 1024


def large_png(side: int, seed: int) -> bytes:
    """A smooth side x side image with a faint pattern: compresses to ~100 kB, decodes to side² x 3 bytes."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(2, 6, 2)
    image = (127 + 60 * np.sin(a * np.pi * x) * np.cos(b * np.pi * y)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(image[..., None], 3, axis=2)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


class PeakRSS:
    """Samples a process's RSS in a thread; `peak()` returns the highest since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        self.process, self._peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._peak = max(self._peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def now(self) -> int:
        return self.process.memory_info().rss

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> int:
        return self._peak

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def post(url: str, path: str, files: list, maps: bool) -> int:
    try:
        return requests.post(url + path, files=files, params={"maps": "true"} if maps else None, timeout=300).status_code
    except requests.RequestException:
        return 0  # no answer at all: counted as status 0


def serve_cases(model: str, side: int) -> list[tuple[str, str, float, int]]:
    """Per case the peak RSS sampled every 20 ms, then the server's true peak over all of them (getrusage after
    it exits; the server is started first, while this process is small, because a child's maximum RSS also
    counts the parent's pages it was forked with)."""
    rows = []
    with tempfile.TemporaryFile() as log:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", model, "--port",
                                    str(port)], stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": SRC})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, timeout=180)
            rss = PeakRSS(process.pid)
            rows.append(("server at rest (model loaded)", "-", 0.0, rss.now()))
            bodies = [large_png(side, seed) for seed in range(4)]
            mp = side * side / 1e6
            huge = large_png(10_000, 9)
            cases = [
                (f"batch of 4 x {mp:.0f} MP with maps ({sum(map(len, bodies)) / MB:.2f} MB body)",
                 lambda: batch(url, bodies)),
                (f"4 concurrent {mp:.0f} MP /predict with maps", lambda: concurrent(url, bodies, 4)),
                (f"16 concurrent {mp:.0f} MP /predict with maps", lambda: concurrent(url, bodies, 16)),
                ("100 MP image (over --max-pixels)", lambda: [post(url, "/predict", [("file", huge)], True)]),
            ]
            for name, case in cases:
                rss.reset()
                start = time.perf_counter()
                statuses = case()
                seconds = time.perf_counter() - start
                rows.append((name, summary(statuses), seconds, rss.peak()))
            time.sleep(2)
            rows.append(("server at rest after the cases", "-", 0.0, rss.now()))
            rss.stop()
        finally:
            process.terminate()
            process.wait(60)
    rows.append(("server's true peak over all cases (getrusage)", "-", 0.0,
                 resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
    return rows


def batch(url: str, bodies: list[bytes]) -> list[int]:
    """The per-file statuses of one /predict/batch of `bodies` with maps."""
    files = [("files", (f"{i}.png", body)) for i, body in enumerate(bodies)]
    response = requests.post(url + "/predict/batch", files=files, params={"maps": "true"}, timeout=300)
    return [item["status"] for item in response.json()["results"]] if response.ok else [response.status_code]


def concurrent(url: str, bodies: list[bytes], clients: int) -> list[int]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: post(url, "/predict", [("file", bodies[i % len(bodies)])], True), range(clients)))


def summary(statuses: list[int]) -> str:
    return ", ".join(f"{statuses.count(s)} x {s}" for s in sorted(set(statuses)))


# Runs a command and prints its peak RSS. It is started fresh (small), so its own child's maximum RSS does not
# include the pages of this large benchmark process, as a direct child's would (they are counted from the fork).
PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
                 "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")


def cli_case(model: str) -> tuple[str, str, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "big.png"
        image.write_bytes(large_png(10_000, 5))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, "-m", "anomalyvfm.cli.main",
                                 "predict", "--model", model, str(image), "--out", str(Path(tmp) / "out")],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=900)
        seconds = time.perf_counter() - start
    code, peak = result.stdout.split()
    return "CLI predict 10000x10000 with pictures (getrusage)", f"exit {code}", seconds, int(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory to serve")
    parser.add_argument("--side", type=int, default=6000, help="side of the large test images (default 6000: 36 MP)")
    parser.add_argument("--skip-cli", action="store_true", help="only the server cases")
    args = parser.parse_args()
    rows = serve_cases(args.model, args.side)
    if not args.skip_cli:
        rows.append(cli_case(args.model))
    width = max(len(name) for name, *_ in rows)
    print(f"| {'case'.ljust(width)} | statuses | seconds | peak RSS MB |")
    print(f"|{'-' * (width + 2)}|----------|---------|-------------|")
    for name, statuses, seconds, peak in rows:
        print(f"| {name.ljust(width)} | {statuses} | {seconds:.1f} | {peak / MB:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
