"""Reliability: one bad image or slow client never hurts another; memory and work per request are bounded.

Service tests run a real uvicorn server on a loopback port. Where a failure or a busy worker is needed, the
backbone is wrapped (`Gate`) so that it fails on one marked image or waits for the test: the service, the
extraction and the CLI under test are the real ones. Concurrent requests are ordered by waiting for a state
of the server (`wait_for`: the worker inside the gate, a job queued, a request waiting for budget), never by
a fixed sleep; the only clocks are hang guards and the timeouts a test is about.
"""
from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from matplotlib import colormaps
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter
from servers import (HANG_GUARD_S, SRC, free_port, live_server, png, serve_process, until, wait_for, wait_for_line,
                     wait_until_serving)

from anomalyvfm import AnomalyDetector
from anomalyvfm.cli.main import main
from anomalyvfm.detector.detector import Prediction
from anomalyvfm.data.images import load_rgb
from anomalyvfm.data.resample import resize
from anomalyvfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise, to_tensor
from anomalyvfm.demo import textured_image
from anomalyvfm.errors import ImageReadError
from anomalyvfm.features.extraction import extract_features
from anomalyvfm.maps import render
from anomalyvfm.service.app import create_app
from anomalyvfm.service.limits import ServiceLimits
from anomalyvfm.service.observability import JsonFormatter
from anomalyvfm.service.worker import InferenceWorker, JobFailed

RNG = np.random.default_rng(11)
GOOD = [textured_image(RNG, 112, 154) for _ in range(4)]
POISON = np.zeros((112, 154, 3), np.uint8)
POISON[..., 0] = POISON[..., 2] = 255  # pure magenta: the only input whose green plane is all at its minimum
THIN = png(np.zeros((1, 20, 3), np.uint8))  # 1x20: would be a 112 x 2240 backbone input
NEEDLE = png(np.zeros((1, 40_000, 3), np.uint8))  # 1x40 000: asked the old service for 96 GB


class Gate:
    """A backbone that fails on crops of `POISON` and, while `hold` is cleared, waits before each batch
    (`holding`: how many crops wait in it now, one per image for these single-view models)."""

    def __init__(self, inner) -> None:
        self.inner, self.hold, self.calls, self.holding = inner, threading.Event(), 0, 0
        self.hold.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.holding = len(x)
        try:
            assert self.hold.wait(HANG_GUARD_S), "hang guard: the test never released the gate"
        finally:
            self.holding = 0
        green_min = (0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
        if (x[:, 1] <= green_min + 1e-3).flatten(1).all(1).any():
            raise MemoryError("injected: poisoned image")
        return self.inner(x)


def gated(app) -> Gate:
    detector = app.state.service.detector
    gate = Gate(detector.pipeline.backbone)
    detector.pipeline.backbone = gate
    return gate


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


@pytest.fixture(scope="module")
def detector(fitted_model) -> AnomalyDetector:
    return AnomalyDetector.load(fitted_model)


@pytest.fixture(scope="module")
def expected(detector) -> list[float]:
    return [p.score for p in detector.predict(GOOD, progress=False)]


# -- library and CLI ----------------------------------------------------------------------------------
def test_extraction_retries_a_failing_batch_image_by_image(detector):
    images = [GOOD[0], GOOD[1], POISON, GOOD[2]]
    reference = [f.features for f in extract_features(detector.pipeline.backbone, [GOOD[0], GOOD[1], GOOD[2]], 112, 4)]
    results = list(extract_features(Gate(detector.pipeline.backbone), images, 112, batch_size=4))
    assert [type(r).__name__ for r in results] == ["ImageFeatures", "ImageFeatures", "FailedImage", "ImageFeatures"]
    assert "MemoryError" in results[2].error and results[2].source == "<image 2>"
    for got, want in zip([results[0], results[1], results[3]], reference):
        torch.testing.assert_close(got.features, want, atol=1e-4, rtol=1e-4)


def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    (tmp_path / "thin.png").write_bytes(NEEDLE)
    with pytest.raises(ImageReadError, match="aspect ratio over the limit of 8:1"):
        load_rgb(tmp_path / "thin.png", max_aspect=8)
    assert load_rgb(tmp_path / "thin.png").shape == (1, 40_000, 3)  # no limit asked: decoded as before


def test_aspect_ratio_limit_is_a_runtime_setting(fitted_model, tmp_path):
    (tmp_path / "thin.png").write_bytes(THIN)
    (refused,) = AnomalyDetector.load(fitted_model).predict([tmp_path / "thin.png"], progress=False)
    assert "aspect ratio over the limit of 8:1" in refused.error
    (scored,) = AnomalyDetector.load(fitted_model, max_aspect_ratio=25).predict([tmp_path / "thin.png"], progress=False)
    assert scored.error is None and scored.anomaly_map.shape == (1, 20)


def test_cli_predict_scores_the_rest_and_writes_each_row_as_scored(fitted_model, tmp_path, detector, expected):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(GOOD[:2]):
        Image.fromarray(image).save(folder / f"a{i}.png")
    (folder / "b_thin.png").write_bytes(THIN)
    (folder / "c_needle.png").write_bytes(NEEDLE)
    assert main(["predict", "--model", str(fitted_model), str(folder), "--out", str(tmp_path / "out")]) == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == ["a0.png", "a1.png", "b_thin.png", "c_needle.png"]
    assert [close(float(r["score"]), s) for r, s in zip(rows[:2], expected)] == [True, True]
    assert all("aspect ratio over the limit" in r["error"] and not r["score"] for r in rows[2:])  # never scored
    assert (tmp_path / "out" / "a1_overlay.png").is_file()

    # A process that dies after two images leaves both rows on disk (rows are flushed as written).
    crash = (f"import os, sys; sys.path.insert(0, {SRC!r})\n"
             "from anomalyvfm.detector.detector import AnomalyDetector\n"
             "original = AnomalyDetector.predict_iter\n"
             "def dying(self, *a, **k):\n"
             "    for i, p in enumerate(original(self, *a, **k)):\n"
             "        if i == 2: os._exit(3)\n"
             "        yield p\n"
             "AnomalyDetector.predict_iter = dying\n"
             "from anomalyvfm.cli.main import main\n"
             f"main(['predict', '--model', {str(fitted_model)!r}, {str(folder)!r}, '--out', {str(tmp_path / 'crash')!r}, "
             "'--no-images'])\n")
    assert subprocess.run([sys.executable, "-c", crash], timeout=120).returncode == 3
    rows = list(csv.DictReader(open(tmp_path / "crash" / "predictions.csv")))
    assert [Path(r["path"]).name for r in rows] == ["a0.png", "a1.png"]


@pytest.mark.parametrize("argv, fragment", [
    (["fit", "--data", "{data}", "--category", "demo", "--backbone", "{backbone}", "--out", "{file}"], "is not a folder"),
    (["predict", "--model", "{model}", "{file}", "--out", "{file}"], "is not a folder"),
    (["serve", "--model", "{model}", "--port", "99999"], "--port must be between 0 and 65535"),
    (["serve", "--model", "{model}", "--max-inflight-pixels", "10", "--max-pixels", "20"], "--max-inflight-pixels"),
    (["fit", "--data", "{ad2}", "--category", "demo", "--layout", "mvtec_ad", "--backbone", "{backbone}", "--out",
      "{tmp}/m"], "use --layout mvtec_ad2"),
])
def test_cli_mistakes_end_in_one_line_before_any_work(argv, fragment, fitted_model, data_root, backbone_dir, tmp_path,
                                                      capsys, monkeypatch):
    """Each mistake is reported before any backbone is loaded (the first step of fitting, predicting or serving)."""
    def no_work(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the mistake was reported")

    monkeypatch.setattr("anomalyvfm.detector.pipeline.load_backbone", no_work)
    monkeypatch.setattr("anomalyvfm.detector.auto.load_backbone", no_work)
    existing = tmp_path / "existing.png"
    existing.write_bytes(png(GOOD[0]))
    values = {"data": data_root, "backbone": backbone_dir, "file": existing, "model": fitted_model, "ad2": data_root,
              "tmp": tmp_path}
    assert main([arg.format(**values) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_bounded_memory_paths_give_the_same_values():
    """to_tensor one channel at a time, the chunked LUT heat map and the chunked mask outline equal the
    whole-array versions."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 457, 3), dtype=np.uint8)
    unit = resize(image.astype(np.float32) / np.float32(255.0), (224, 336), antialias=True).transpose(2, 0, 1)
    assert torch.equal(to_tensor(image, (224, 336)), torch.from_numpy(normalise(np.ascontiguousarray(unit))))
    reference = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)  # torch's own antialiased resize
    reference = torch.nn.functional.interpolate(reference[None], size=(224, 336), mode="bilinear", antialias=True)[0]
    assert torch.allclose(torch.from_numpy(unit), reference, atol=1e-4)

    amap = (rng.random((300, 500)) * 3 - 1).astype(np.float32)
    amap[0, :256] = np.arange(256) / 256  # every bin edge
    colours = (colormaps["jet"](np.clip((amap - 0.1) / 0.8, 0, 1).astype(np.float32))[..., :3] * 255).astype(np.uint8)
    mask = gaussian_filter(rng.random((401, 97)), 4) > 0.5
    mask[:5] = True  # touches the border
    old_chunk = render.ROW_CHUNK_PIXELS
    render.ROW_CHUNK_PIXELS = 1000  # many chunks, some thinner than the outline width
    try:
        np.testing.assert_array_equal(render.heatmap(amap, 0.1, 0.9), colours)
        for width in (1, 7, 30):
            np.testing.assert_array_equal(render.outline(mask, width), mask & ~binary_erosion(mask, iterations=width))
    finally:
        render.ROW_CHUNK_PIXELS = old_chunk


# -- service: isolation ------------------------------------------------------------------------------
class ScriptedDetector:
    """A stand-in detector for the worker alone: each batch waits for `release`; one holding POISON raises."""

    runtime = SimpleNamespace(batch_size=8)

    def __init__(self) -> None:
        self.release, self.batches = threading.Event(), []

    def predict_iter(self, images, progress=None):
        self.batches.append(len(images))
        assert self.release.wait(HANG_GUARD_S), "hang guard: the test never released the worker"
        if any(image is POISON for image in images):
            raise MemoryError("injected")
        for image in images:
            yield Prediction(source="x", score=float(image.mean()))


def test_worker_answers_a_batch_failure_only_to_the_job_that_causes_it():
    detector = ScriptedDetector()
    worker = InferenceWorker(SimpleNamespace(detector=detector), max_queue=8)

    async def run() -> list:
        first = asyncio.ensure_future(worker.predict(GOOD[3], False, HANG_GUARD_S))
        await until(lambda: detector.batches == [1], "the worker starting the first batch")
        rest = [asyncio.ensure_future(worker.predict(image, False, HANG_GUARD_S))
                for image in (GOOD[0], POISON, GOOD[1], GOOD[2])]
        await until(lambda: worker.depth == 4, "four jobs queued behind the first: the next batch")
        detector.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    worker.start()
    try:
        results = asyncio.run(run())
    finally:
        worker.stop(5)
    assert detector.batches == [1, 4, 1, 1, 1, 1]  # the failed batch of four, then each of its images alone
    assert isinstance(results[2], JobFailed) and "MemoryError" in str(results[2])
    scores = [results[i][0].score for i in (0, 1, 3, 4)]
    assert scores == [float(GOOD[i].mean()) for i in (3, 0, 1, 2)]


@pytest.fixture(scope="module")
def gated_server(fitted_model):
    limits = ServiceLimits(request_timeout=20)
    app = create_app(fitted_model, limits=limits)
    gate = gated(app)
    with live_server(app, limits) as base:
        yield base, gate, app.state.service


def post_image(base: str, data: bytes, name: str = "x.png", **kwargs) -> requests.Response:
    return requests.post(base + "/predict", files={"file": (name, data, "image/png")}, timeout=60, **kwargs)


def test_one_poisoned_job_fails_alone_and_concurrent_clients_get_their_scores(gated_server, expected):
    base, gate, service = gated_server
    bodies = [png(image) for image in GOOD] + [png(POISON)]
    gate.hold.clear()  # the worker takes what has arrived and waits in the backbone; the rest queue behind it
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(post_image, base, body) for body in bodies]
        wait_for(lambda: gate.holding + service.worker.depth == 5, "all five jobs in the gate or queued")
        gate.hold.set()  # whichever batch holds POISON fails, then its jobs are scored one by one
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 500]
    assert all(close(r.json()["score"], s) for r, s in zip(responses, expected))
    detail = responses[4].json()["detail"]
    assert "MemoryError" in detail and "\n" not in detail
    batch = requests.post(base + "/predict/batch", timeout=60, files=[
        ("files", ("good.png", bodies[0])), ("files", ("thin.png", THIN)), ("files", ("needle.png", NEEDLE)),
        ("files", ("poison.png", bodies[4]))]).json()["results"]
    assert [(r["filename"], r["status"]) for r in batch] == [("good.png", 200), ("thin.png", 422), ("needle.png", 422),
                                                             ("poison.png", 500)]
    assert close(batch[0]["score"], expected[0]) and "aspect ratio" in batch[2]["error"]


# -- service: backpressure, deadlines, budgets -------------------------------------------------------
def test_pixel_budget_waits_then_deadline_answers_503(fitted_model):
    """With room for two images' pixels, a third request waits undecoded, then gets 503 at its deadline.

    The deadline (10 s) only has to outlast the three requests reaching their places, which are waited for."""
    limits = ServiceLimits(max_queue=4, request_timeout=10, max_pixels=20_000, max_inflight_pixels=40_000)
    app = create_app(fitted_model, limits=limits, batch_size=1)
    service, gate, body = app.state.service, gated(app), png(GOOD[0])  # 17 248 px each
    with live_server(app, limits) as base, ThreadPoolExecutor(4) as pool:
        gate.hold.clear()  # the worker takes the first job and waits in the backbone
        first = pool.submit(post_image, base, body)
        wait_for(lambda: gate.calls > 0, "the worker waiting in the backbone")
        second = pool.submit(post_image, base, body)
        wait_for(lambda: service.worker.depth == 1, "the second image queued")
        third = pool.submit(post_image, base, body)  # no room in the budget: waits before decoding
        wait_for(lambda: service.pixels.waiting == 1, "the third request waiting for pixel budget")
        assert service.pixels.used == 2 * 17_248 and service.worker.depth == 1 and not third.done()
        assert requests.get(base + "/health/ready", timeout=10).status_code == 200  # waiting is not "full"
        responses = [f.result() for f in (first, second, third)]
        gate.hold.set()
        assert [r.status_code for r in responses] == [503, 503, 503]
        assert all(r.headers["Retry-After"] == "1" and "retry shortly" in r.json()["detail"] for r in responses)
        assert "deadline" in responses[0].json()["detail"]
        assert service.pixels.used == 0
        assert post_image(base, body).status_code == 200


def test_full_queue_answers_503_with_retry_after_and_readiness_says_so(fitted_model):
    limits = ServiceLimits(max_queue=1, request_timeout=30)
    app = create_app(fitted_model, limits=limits, batch_size=1)
    service, gate, body = app.state.service, gated(app), png(GOOD[0])
    with live_server(app, limits) as base, ThreadPoolExecutor(4) as pool:
        gate.hold.clear()
        first = pool.submit(post_image, base, body)
        wait_for(lambda: gate.calls > 0, "the worker waiting in the backbone")
        second = pool.submit(post_image, base, body)
        wait_for(lambda: service.worker.depth == 1, "the second image queued: the queue (1) is full")
        full = post_image(base, body)
        assert full.status_code == 503 and full.headers["Retry-After"] == "1" and "queue is full" in full.json()["detail"]
        ready = requests.get(base + "/health/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["queue_depth"] == 1
        assert requests.get(base + "/health", timeout=10).json() == {"status": "ok"}
        assert requests.get(base + "/health/live", timeout=10).json() == {"status": "ok"}
        gate.hold.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert requests.get(base + "/health/ready", timeout=10).json()["status"] == "ready"


# -- service: slow clients ---------------------------------------------------------------------------
def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _open_and_unanswered(sock: socket.socket) -> bool:
    """The server has neither answered nor closed `sock` (nothing to read yet)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(30)
    return False


def test_slow_clients_do_not_block_health_or_other_clients(fitted_model, expected):
    """127 slow clients held open: health and a prediction are answered while every one of them is still
    waiting (checked on their sockets, not by a clock); then the timeouts free them."""
    limits = ServiceLimits(header_timeout=10, body_timeout=10)
    with live_server(create_app(fitted_model, limits=limits), limits) as base:
        sockets = []
        try:
            for _ in range(64):  # connections with unfinished headers
                sock = _connect(base)
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
                sockets.append(sock)
            for _ in range(63):  # uploads that stall after half their body
                sock = _connect(base)
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                             b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                             b"filename=\"x.png\"\r\n\r\n" + bytes(1000))
                sockets.append(sock)
            assert requests.get(base + "/health", timeout=30).status_code == 200
            assert requests.get(base + "/health/ready", timeout=30).status_code == 200
            response = post_image(base, png(GOOD[0]))
            assert response.status_code == 200 and close(response.json()["score"], expected[0])
            assert all(map(_open_and_unanswered, sockets)), "a slow client timed out before the others were answered"

            # Then the timeouts free the connections: headers closed silently, stalled bodies get 408.
            assert sockets[0].recv(100) == b""
            answer = b""
            while not answer.endswith(b"}"):  # headers and the JSON body may come in separate segments
                chunk = sockets[64].recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"request body not received within 10 s" in answer
        finally:
            for sock in sockets:
                sock.close()


def test_sigterm_with_a_stalled_upload_stops_within_the_shutdown_deadline(fitted_model):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", str(fitted_model),
                                "--port", str(port), "--shutdown-timeout", "2"], env={**os.environ, "PYTHONPATH": SRC},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, base)
        stalled = _connect(base)
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 100000\r\n\r\n--b\r\n")
        # An answer on a later connection: the server's one event loop accepts connections in order, so it
        # has accepted the stalled one, whose bytes were already waiting, before SIGTERM is sent.
        assert requests.get(base + "/health", timeout=30).status_code == 200
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        stopped = time.monotonic() - start
        stalled.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert stopped < 8, f"took {stopped:.1f} s"
    assert "Traceback" not in output


def test_sigterm_drains_a_request_in_flight(fitted_model, expected):
    """SIGTERM stops serve gracefully: a request in flight is answered before the process exits.

    The request is in flight for sure when the signal comes: its headers ask `Expect: 100-continue`, and the
    server answers `100 Continue` only once the app reads the body. The body follows the server's drain line.
    (SIGHUP reloads the model instead: tests/test_update.py.)
    """
    sig = signal.SIGTERM
    port = free_port()
    process, lines = serve_process(fitted_model, port)
    base, seen = f"http://127.0.0.1:{port}", []
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png(GOOD[0]) + b"\r\n--b--\r\n")
    try:
        wait_until_serving(process, base)
        client = _connect(base)
        client.settimeout(60)
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Content-Type: multipart/form-data; boundary=b\r\n" +
                       f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert client.recv(100).startswith(b"HTTP/1.1 100 Continue")  # the app is reading this request's body
        process.send_signal(sig)
        drain = wait_for_line(lines, seen, f"{sig.name}: draining")
        assert json.loads(drain)["in_flight"] == 1
        client.sendall(body)
        answer = b""
        while chunk := client.recv(65536):  # the server closes the connection after the answer: it is draining
            answer += chunk
        client.close()
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    while not lines.empty():
        seen.append(lines.get())
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert close(json.loads(answer.split(b"\r\n\r\n", 1)[1])["score"], expected[0])
    assert process.returncode == -signal.SIGTERM, "".join(seen)
    assert "Traceback" not in "".join(seen)
    with pytest.raises(requests.ConnectionError):  # and it no longer listens
        requests.get(base + "/health", timeout=5)


# -- service: operations -----------------------------------------------------------------------------
def test_request_id_json_access_log_and_one_line_disconnects(fitted_model, caplog):
    caplog.set_level(logging.INFO, logger="anomalyvfm")
    app = create_app(fitted_model)
    with live_server(app) as base:
        response = post_image(base, png(GOOD[0]), headers={"X-Request-ID": "camera-7.frame-42"})
        assert response.headers["X-Request-ID"] == "camera-7.frame-42"
        generated = requests.get(base + "/health", timeout=10, headers={"X-Request-ID": "bad id with spaces"})
        assert len(generated.headers["X-Request-ID"]) == 32
        sock = _connect(base)  # a client that goes away mid-upload
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                     b"filename=\"x.png\"\r\n\r\n" + bytes(500))
        wait_for(lambda: app.state.service.body_bytes.used > 0, "the server reading the upload")
        sock.close()
        wait_for(lambda: any(getattr(r, "fields", {}).get("event") == "client_disconnected" for r in caplog.records),
                 "the disconnect logged")
    fields = [getattr(r, "fields", {}) for r in caplog.records]
    scored = [f for f in fields if f.get("request_id") == "camera-7.frame-42"]
    assert scored and scored[0]["status"] == 200 and scored[0]["path"] == "/predict" and scored[0]["duration_ms"] > 0
    disconnects = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "client_disconnected"]
    assert len(disconnects) == 1 and not disconnects[0].exc_info
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    line = JsonFormatter().format(disconnects[0])
    assert "\n" not in line and json.loads(line)["event"] == "client_disconnected"


def test_metrics_and_offline_docs(fitted_model):
    pytest.importorskip("prometheus_client", reason="metrics need the serve extra (prometheus-client)")
    pytest.importorskip("swagger_ui_bundle", reason="offline /docs needs the serve extra (swagger-ui-bundle-v2)")
    with live_server(create_app(fitted_model)) as base:
        for image in GOOD[:2]:
            assert post_image(base, png(image)).status_code == 200
        assert post_image(base, THIN).status_code == 422
        text = requests.get(base + "/metrics", timeout=10).text
        assert 'anomalyvfm_requests_total{method="POST",route="/predict",status="200"} 2.0' in text
        assert 'anomalyvfm_requests_total{method="POST",route="/predict",status="422"} 1.0' in text
        assert "anomalyvfm_images_scored_total 2.0" in text and "anomalyvfm_anomalies_total" in text
        assert "anomalyvfm_queue_depth 0.0" in text and "anomalyvfm_batch_size_count" in text
        assert 'anomalyvfm_request_duration_seconds_bucket{le="+Inf",route="/predict"} 3.0' in text
        page = requests.get(base + "/docs", timeout=10).text
        assert "/docs/assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert requests.get(f"{base}/docs/assets/{asset}", timeout=10).status_code == 200
