"""Throughput and latency of `anomalyvfm serve` on loopback: N requests from T client threads.

    python benchmarks/serve_load.py --model models/CAT --images path/to/images --requests 200 --threads 8

Starts `anomalyvfm serve` on a free loopback port (or targets a running server with --url), posts the
images of --images round-robin to /predict, and prints req/s and p50/p95 latency. Each client thread keeps
one connection open, as a camera station would. It is bounded — at most 10 000 requests and --max-seconds
of load — and loopback-only: it measures this machine's server, it is not a load generator for others.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image

from anomalyvfm.data import list_images

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, log: IO[bytes]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", args.model, "--port", str(port),
               "--device", args.device, "--batch-size", str(args.batch_size)]
    if getattr(args, "store", None):
        command += ["--store", args.store]
    return subprocess.Popen(command, stdout=log, stderr=log), f"http://127.0.0.1:{port}"


def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no healthy server at {url} after {timeout:.0f}s")


def run_load(url: str, images: list[tuple[str, bytes]], count: int, threads: int, headers: dict[str, str],
             maps: bool, deadline: float) -> list[tuple[float, int, float]]:
    """(latency s, HTTP status, server elapsed ms) per request sent before `deadline`."""
    local = threading.local()

    def one(i: int) -> tuple[float, int, float] | None:
        if time.monotonic() > deadline:
            return None
        session = local.__dict__.setdefault("session", requests.Session())
        name, data = images[i % len(images)]
        start = time.perf_counter()
        try:
            response = session.post(url + "/predict", files={"file": (name, data)}, headers=headers,
                                    params={"maps": "true"} if maps else None, timeout=120)
        except requests.RequestException:
            return time.perf_counter() - start, 0, float("nan")
        server_ms = response.json()["elapsed_ms"] if response.ok else float("nan")
        return time.perf_counter() - start, response.status_code, server_ms

    with ThreadPoolExecutor(threads) as pool:
        return [r for r in pool.map(one, range(count)) if r is not None]


def report(results: list[tuple[float, int, float]], wall: float, args: argparse.Namespace) -> None:
    latency = np.array([r[0] for r in results if r[1] == 200]) * 1000
    server = np.array([r[2] for r in results if r[1] == 200])
    ok = len(latency)
    row = {
        "requests": f"{len(results)}/{args.requests}", "threads": str(args.threads), "ok": str(ok),
        "failed": str(len(results) - ok), "wall s": f"{wall:.2f}", "req/s": f"{ok / wall:.1f}",
        "p50 ms": f"{np.percentile(latency, 50):.1f}" if ok else "-",
        "p95 ms": f"{np.percentile(latency, 95):.1f}" if ok else "-",
        "max ms": f"{latency.max():.1f}" if ok else "-",
        "server p50 ms": f"{np.nanpercentile(server, 50):.1f}" if ok else "-",
    }
    widths = {k: max(len(k), len(v)) for k, v in row.items()}
    print("| " + " | ".join(k.rjust(widths[k]) for k in row) + " |")
    print("|" + "|".join("-" * (widths[k] + 2) for k in row) + "|")
    print("| " + " | ".join(v.rjust(widths[k]) for k, v in row.items()) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory; a server is started for it (unless --url)")
    parser.add_argument("--url", help="target a running server instead, e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--images", required=True, help="folder of images to post, round-robin")
    parser.add_argument("--requests", type=int, default=200, help=f"requests to send (1..{MAX_REQUESTS})")
    parser.add_argument("--threads", type=int, default=8, help="client threads, one connection each (1..64)")
    parser.add_argument("--maps", action="store_true", help="ask for heat map and mask PNGs too")
    parser.add_argument("--max-seconds", type=float, default=120, help="stop sending after this long")
    parser.add_argument("--api-key", default=os.environ.get("ANOMALYVFM_API_KEY"), help="X-API-Key to send")
    parser.add_argument("--device", default="cpu", help="device of the started server")
    parser.add_argument("--batch-size", type=int, default=8, help="largest inference batch of the started server")
    parser.add_argument("--store", help="the started server records every verdict in this store (serve --store)")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.threads <= 64:
        parser.error(f"--requests must be 1..{MAX_REQUESTS} and --threads 1..64")
    if (args.url is None) == (args.model is None):
        parser.error("give exactly one of --model (start a server) and --url (use a running one)")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must be a loopback address ({', '.join(LOOPBACK)})")
    images = [(path.name, path.read_bytes()) for path in list_images(args.images)]
    with Image.open(Path(args.images) / images[0][0]) as first:
        size = f"{first.width}x{first.height}"

    with tempfile.TemporaryFile() as log:
        process, url = start_server(args, log) if args.model else (None, args.url.rstrip("/"))
        try:
            wait_healthy(url, process, timeout=120)
            headers = {"X-API-Key": args.api_key} if args.api_key else {}
            warmup = run_load(url, images, args.threads, args.threads, headers, args.maps, time.monotonic() + 60)
            if any(status != 200 for _, status, _ in warmup):
                raise RuntimeError(f"warm-up requests failed with status {sorted({s for _, s, _ in warmup})}")
            start = time.perf_counter()
            results = run_load(url, images, args.requests, args.threads, headers, args.maps,
                               time.monotonic() + args.max_seconds)
            wall = time.perf_counter() - start
        except RuntimeError as exc:
            log.seek(0)
            print(f"serve_load: {exc}\n{log.read().decode(errors='replace')[-2000:]}", file=sys.stderr)
            return 1
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
    print(f"{url}: {len(images)} images ({size} first), maps {'on' if args.maps else 'off'}"
          + (f", server started here on {args.device}" if process else ""))
    report(results, wall, args)
    return 0 if all(status == 200 for _, status, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
