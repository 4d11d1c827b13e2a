"""The HTTP service, tested through a real uvicorn server on a loopback port (no TestClient, no mocks)."""
from __future__ import annotations

import base64
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests
from helpers import bomb_png
from PIL import Image
from servers import LIMITS, MAX_BYTES, MAX_FILES, close, free_port, live_server, png, wait_until_serving

from anomalyvfm import AnomalyDetector, __version__
from anomalyvfm.cli.main import main
from anomalyvfm.declare import to_dict
from anomalyvfm.demo import paste_defect, textured_image
from anomalyvfm.service.app import create_app
from anomalyvfm.maps.render import display_range, heatmap, mask_image

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def url(fitted_model) -> Iterator[str]:
    with live_server(create_app(fitted_model, limits=LIMITS), LIMITS) as base:
        yield base


@pytest.fixture(scope="module")
def detector(fitted_model) -> AnomalyDetector:
    return AnomalyDetector.load(fitted_model)


@pytest.fixture(scope="module")
def bad_image(data_root) -> Path:
    return data_root / "demo" / "test_public" / "bad" / "000_regular.png"


def post(url: str, path: str = "/predict", **kwargs) -> requests.Response:
    return requests.post(url + path, timeout=60, **kwargs)


def test_prediction_equals_detector_and_cli_predict(url, detector, fitted_model, bad_image, tmp_path):
    expected = detector.predict([bad_image], progress=False)[0]
    body = post(url, files={"file": (bad_image.name, bad_image.read_bytes(), "image/png")}).json()
    assert set(body) == {"score", "is_anomalous", "threshold", "model", "model_version", "elapsed_ms"}
    assert close(body["score"], expected.score) and body["is_anomalous"] is expected.is_anomalous is True
    assert body["threshold"] == detector.thresholds().image_threshold and body["model"] == fitted_model.name
    assert body["elapsed_ms"] > 0

    assert main(["predict", "--model", str(fitted_model), str(bad_image), "--out", str(tmp_path), "--no-images"]) == 0
    (row,) = csv.DictReader(open(tmp_path / "predictions.csv"))
    assert row["score"] == f"{body['score']:.6g}"

    body = post(url, params={"maps": "true"}, files={"file": bad_image.read_bytes()}).json()
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["anomaly_map_png"]))))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    t = detector.thresholds()
    np.testing.assert_array_equal(heat, heatmap(expected.anomaly_map, *display_range(t.validation_stats["pixel_score_mean"],
                                                                                     t.pixel_threshold)))
    np.testing.assert_array_equal(mask, mask_image(expected.mask))
    assert mask.shape == (112, 154) and set(np.unique(mask)) == {0, 255}


def test_batch_scores_good_files_and_reports_bad_ones(url, detector, data_root, bad_image):
    good_image = data_root / "demo" / "test_public" / "good" / "000_regular.png"
    files = [("files", ("bad.png", bad_image.read_bytes())), ("files", ("junk.png", b"not an image")),
             ("files", ("notes.txt", b"hello", "text/plain")), ("files", ("good.png", good_image.read_bytes()))]
    response = post(url, "/predict/batch", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["filename"], r["status"]) for r in results] == [("bad.png", 200), ("junk.png", 422), ("notes.txt", 415),
                                                               ("good.png", 200)]
    expected = detector.predict([bad_image, good_image], progress=False)
    assert close(results[0]["score"], expected[0].score) and close(results[3]["score"], expected[1].score)
    assert results[0]["is_anomalous"] and not results[3]["is_anomalous"]
    assert "not a recognised image format" in results[1]["error"] and "score" not in results[1]


def _chunked(data: bytes, boundary: str = "b0undary") -> Iterator[bytes]:
    """A multipart body sent without Content-Length, so only the streamed byte count can stop it."""
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'.encode()
    for start in range(0, len(data), 65536):
        yield data[start:start + 65536]
    yield f"\r\n--{boundary}--\r\n".encode()


IMAGE = png(textured_image(np.random.default_rng(3), 112, 154))
NOISE = png(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))  # ~270 kB: body over limit
PADDED = IMAGE + bytes(MAX_BYTES + 1 - len(IMAGE))  # valid PNG plus trailing bytes: over the per-file limit only
MULTIPART = {"Content-Type": "multipart/form-data; boundary=b0undary"}
BAD_REQUESTS = [  # name, path, request arguments, status, fragment of the detail
    ("not an image", "/predict", {"files": {"file": ("a.png", b"plain text")}}, 422, "not a recognised image format"),
    ("truncated", "/predict", {"files": {"file": ("t.png", IMAGE[: len(IMAGE) // 2])}}, 422, "truncated"),
    ("too many pixels", "/predict", {"files": {"file": ("p.png", png(np.zeros((400, 300, 3), np.uint8)))}}, 413,
     "120000 pixels, over the limit of 100000"),
    ("decompression bomb", "/predict", {"files": {"file": ("bomb.png", bomb_png())}}, 413, "decompression bomb"),
    ("file over byte limit", "/predict", {"files": {"file": ("big.png", PADDED)}}, 413, f"over the limit of {MAX_BYTES}"),
    ("body over byte limit", "/predict", {"files": {"file": ("big.png", NOISE)}}, 413, "request body of"),
    ("chunked body over limit", "/predict", {"data": _chunked(NOISE), "headers": MULTIPART}, 413, "request body is over"),
    ("text part", "/predict", {"files": {"file": ("a.txt", b"hello", "text/plain")}}, 415, "text/plain is not an image"),
    ("text body", "/predict", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "not multipart"),
    ("raw png body", "/predict", {"data": IMAGE, "headers": {"Content-Type": "image/png"}}, 415, "not multipart"),
    ("no body", "/predict", {}, 400, "no image sent"),
    ("empty multipart", "/predict", {"data": b"", "headers": MULTIPART}, 400, "no file in multipart field 'file'"),
    ("empty file", "/predict", {"files": {"file": ("e.png", b"")}}, 400, "e.png: file is empty"),
    ("wrong field", "/predict", {"files": {"image": ("a.png", IMAGE)}}, 400, "no file in multipart field 'file'"),
    ("text field", "/predict", {"data": {"file": "a.png"}, "files": {"x": ("x", b"")}}, 400, "must be a file upload"),
    ("two files", "/predict", {"files": [("file", ("a.png", IMAGE))] * 2}, 400, "Too many files"),
    ("broken multipart", "/predict", {"data": b"garbage", "headers": MULTIPART}, 400, "multipart body refused"),
    ("bad query", "/predict", {"params": {"maps": "maybe"}, "files": {"file": ("a.png", IMAGE)}}, 422, "query.maps"),
    ("too many batch files", "/predict/batch", {"files": [("files", ("a.png", IMAGE))] * (MAX_FILES + 1)}, 400,
     "Too many files"),
]


@pytest.mark.parametrize("name, path, kwargs, status, fragment", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_one_line_json_error_and_serving_goes_on(url, name, path, kwargs, status, fragment):
    response = post(url, path, **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and fragment in detail and "\n" not in detail, detail
    assert post(url, files={"file": IMAGE}).status_code == 200


def test_health_model_info_and_openapi(url, detector, fitted_model):
    assert requests.get(url + "/health", timeout=10).json() == {"status": "ok"}
    info = requests.get(url + "/model", timeout=10).json()
    s, t = detector.settings, detector.thresholds()
    assert info["model"] == fitted_model.name and info["backbone"] == s.backbone and info["layers"] == list(s.layers)
    assert info["image_size"] == 112 and info["scorer"] == s.scorer and info["package_version"] == __version__
    assert info["image_threshold"] == t.image_threshold and info["pixel_threshold"] == t.pixel_threshold
    assert info["threshold_evidence"] == {level: e["text"] for level, e in t.evidence.items()}
    assert info["train_images"] == detector.record.train_images > 0 and info["fitted_at"].startswith("20")
    assert info["score"] == "distance" and info["lora"] is None and set(to_dict(s)) <= set(info)
    assert info["limits"] == vars(LIMITS) and info["max_aspect_ratio"] == detector.runtime.max_aspect_ratio
    spec = requests.get(url + "/openapi.json", timeout=10).json()
    assert {"/predict", "/predict/batch", "/health", "/model"} <= set(spec["paths"])
    assert all(op.get("summary") for path in spec["paths"].values() for op in path.values())
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    assert requests.get(url + "/docs", timeout=10).status_code == 200


def test_api_key_guards_everything_but_health(fitted_model, bad_image):
    with live_server(create_app(fitted_model, api_key="s3cret")) as base:
        files = {"file": bad_image.read_bytes()}
        for headers in ({}, {"X-API-Key": "wrong"}):
            for method, path, kwargs in (("post", "/predict", {"files": files}), ("get", "/model", {})):
                response = requests.request(method, base + path, headers=headers, timeout=60, **kwargs)
                assert response.status_code == 401 and "X-API-Key" in response.json()["detail"]
        assert requests.get(base + "/health", timeout=10).status_code == 200
        assert requests.post(base + "/predict", files=files, headers={"X-API-Key": "s3cret"}, timeout=60).status_code == 200


def test_cli_serve_runs_a_server_with_the_key_from_the_environment(fitted_model, bad_image):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC, "ANOMALYVFM_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", str(fitted_model),
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, base)
        files = {"file": bad_image.read_bytes()}
        assert requests.post(base + "/predict", files=files, timeout=60).status_code == 401
        assert requests.post(base + "/predict", files=files, headers={"X-API-Key": "from-env"}, timeout=60).ok
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "Application shutdown complete" in output and "Traceback" not in output


@pytest.mark.parametrize("key, option", [("", False), ("   ", False), ("\t\n", False), ("", True)])
def test_an_empty_api_key_is_refused_at_start(key, option, tmp_path, monkeypatch, capsys):
    """A set but empty key (an unrendered secret in a unit file) used to switch authentication off."""
    monkeypatch.setenv("ANOMALYVFM_API_KEY", "ignored-when-the-option-is-given" if option else key)
    argv = ["serve", "--model", str(tmp_path), "--port", str(free_port())] + (["--api-key", key] if option else [])
    assert main(argv) == 2  # refused before the model: tmp_path is no model, and the error is not about it
    err = capsys.readouterr().err
    assert f"{'--api-key' if option else 'ANOMALYVFM_API_KEY'} is set but empty" in err, err
    assert len(err.strip().splitlines()) == 1


def test_create_app_refuses_an_empty_api_key(fitted_model):
    from anomalyvfm.errors import UserInputError

    with pytest.raises(UserInputError, match="API key is empty"):
        create_app(fitted_model, api_key=" ")


@pytest.mark.parametrize("extra, fragment", [([], "not a model directory"), (["--max-pixels", "0"], "--max-pixels")])
def test_cli_serve_user_mistakes_exit_2_with_one_line(extra, fragment, fitted_model, tmp_path, capsys):
    model = tmp_path if not extra else fitted_model
    assert main(["serve", "--model", str(model), "--port", str(free_port()), *extra]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_cli_serve_port_in_use_exits_2_with_one_line_before_loading(fitted_model, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(fitted_model), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


def test_concurrent_clients_get_their_own_results(url, detector, tmp_path):
    """200 requests from 8 threads over 50 distinct images: none fails, none gets another image's score."""
    rng = np.random.default_rng(7)
    images = []
    for i in range(50):
        image = textured_image(rng, 112, 154)
        images.append(paste_defect(rng, image)[0] if i % 2 else image)
    expected = [p.score for p in detector.predict(images, progress=False)]
    assert min(np.diff(sorted(expected))) > 1e-5  # 10x the comparison tolerance: a mix-up cannot pass
    encoded = [png(image) for image in images]
    local = threading.local()

    def request(i: int) -> tuple[int, int, float | None]:
        session = local.__dict__.setdefault("session", requests.Session())
        response = session.post(url + "/predict", files={"file": (f"{i % 50}.png", encoded[i % 50])}, timeout=120)
        return i % 50, response.status_code, response.json().get("score")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(request, range(200)))
    assert [status for _, status, _ in results] == [200] * 200
    mixed = [(index, score) for index, _, score in results if not close(score, expected[index])]
    assert not mixed
