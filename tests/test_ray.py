"""The Ray engine on a real one-machine Ray cluster (127.0.0.1, 2 CPUs), and the scorer merges it relies on.

The merge tests need no Ray; every other test skips, saying why, where Ray is not installed
(`pip install 'anomalyvfm[ray]'`).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from anomalyvfm.cli.main import main
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.distributed.predict import HOLD_ENV
from anomalyvfm.errors import UserInputError
from anomalyvfm.prediction import Prediction
from anomalyvfm.scoring.scorers import KNNScorer, MahalanobisScorer

HANG_GUARD_S = 600  # only a hung cluster takes this long; no verdict waits on a shorter clock


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, one_thread):
    """One local Ray cluster for the module (starting one costs seconds). Its workers inherit `HOLD_ENV`,
    naming a folder that does not exist until `held_batches` creates it, so other tests are never held.
    The driver's own (reference) runs use one torch thread, as each one-CPU actor does."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'anomalyvfm[ray]' to run these tests")
    from anomalyvfm.distributed.cluster import quiet_ray_data

    os.environ[HOLD_ENV] = str(tmp_path_factory.mktemp("hold") / "batches")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=256 * 2**20,
             log_to_driver=False)
    quiet_ray_data(ray)
    yield ray
    ray.shutdown()
    del os.environ[HOLD_ENV]


@pytest.fixture
def held_batches(ray_cluster) -> Iterator[Path]:
    """The hook folder, existing for one test: every scoring actor marks each batch it starts there (a file
    named by its pid) and waits until the test writes `release`."""
    folder = Path(os.environ[HOLD_ENV])
    folder.mkdir()
    try:
        yield folder
    finally:
        (folder / "release").touch()  # never leave an actor waiting, whatever the test did
        shutil.rmtree(folder)


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "predictions.csv")))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_root) -> Path:
    """16 test images and one corrupt file in one folder."""
    folder = tmp_path_factory.mktemp("inputs")
    for label in ("good", "bad"):
        for image in sorted((data_root / "demo" / "test_public" / label).glob("*.png")):
            shutil.copy(image, folder / f"{label}_{image.name}")
    (folder / "zz_corrupt.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def local_predictions(fitted_model, inputs, one_thread) -> dict[str, Prediction]:
    """The local engine's prediction of every input, keyed by path: the reference each Ray run must equal."""
    paths = [str(p) for p in sorted(inputs.iterdir())]
    return dict(zip(paths, AnomalyDetector.load(fitted_model).predict_iter(paths, progress=None)))


def _assert_equal_to_local(rows: list[dict], local: dict[str, Prediction]) -> None:
    """CSV rows (path, score, is_anomalous, error) as the local engine predicts them."""
    for row in rows:
        mine = local[row["path"]]
        if mine.error:
            assert "cannot read image" in row["error"], row
            continue
        assert row["error"] == "", row
        assert abs(float(row["score"]) - mine.score) < 1e-4 * max(1, abs(mine.score)), (row, mine.score)
        assert row["is_anomalous"] == str(int(mine.is_anomalous)), (row, mine.is_anomalous)


# -- merges (no Ray needed) ---------------------------------------------------------------------------
def test_mahalanobis_merge_equals_one_stream():
    x = torch.randn(600, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    whole, a, b = MahalanobisScorer(), MahalanobisScorer(), MahalanobisScorer()
    whole.partial_fit(x)
    a.partial_fit(x[:250])
    b.partial_fit(x[250:])
    a.merge(b)
    whole.finalize(), a.finalize()
    assert torch.allclose(whole.mean, a.mean, atol=1e-6) and torch.allclose(whole.whitener, a.whitener, atol=1e-5)


def test_knn_merge_below_capacity_keeps_every_patch():
    x = torch.randn(300, 8)
    a, b = KNNScorer(max_candidates=1000), KNNScorer(max_candidates=1000, seed=1)
    a.partial_fit(x[:100]), b.partial_fit(x[100:])
    a.merge(b)
    assert a._seen == 300 and len(a._reservoir) == 300
    assert {tuple(r) for r in a._reservoir.tolist()} == {tuple(r) for r in torch.nn.functional.normalize(x).tolist()}


def test_knn_merge_is_a_uniform_sample_of_the_union():
    """The stated bound: after merging, every patch is kept with probability M / (n_a + n_b), whichever
    worker saw it. Here n_a = 1500, n_b = 500, M = 200 (p = 0.1), 300 seeded merges: the share of the
    reservoir from worker a must be 3/4 (hypergeometric mean) and each patch's keep rate 0.1, both
    within 4 standard errors, as for one scorer that saw all 2000 patches in one stream."""
    n_a, n_b, m, trials = 1500, 500, 200, 300
    angle = torch.linspace(0, 3, n_a + n_b)  # patch i is the unit vector at angle i: a kept row names its patch
    ids = torch.stack([angle.cos(), angle.sin()], 1)
    kept = np.zeros(n_a + n_b)
    from_a = []
    for t in range(trials):
        a, b = KNNScorer(max_candidates=m, seed=2 * t), KNNScorer(max_candidates=m, seed=2 * t + 1)
        a.partial_fit(ids[:n_a]), b.partial_fit(ids[n_a:])
        a.merge(b)
        assert len(a._reservoir) == m and a._seen == n_a + n_b
        index = torch.round(torch.atan2(a._reservoir[:, 1], a._reservoir[:, 0]) / 3 * (n_a + n_b - 1)).long().numpy()
        assert len(set(index)) == m  # a sample without replacement
        kept[index] += 1
        from_a.append((index < n_a).sum())
    p = m / (n_a + n_b)
    share_sd = np.sqrt(m * 0.75 * 0.25 * (n_a + n_b - m) / (n_a + n_b - 1) / trials)
    assert abs(np.mean(from_a) - m * 0.75) < 4 * share_sd
    for part in (kept[:n_a], kept[n_a:]):
        assert abs(part.mean() / trials - p) < 4 * np.sqrt(p * (1 - p) / (trials * len(part)))


# -- predict --------------------------------------------------------------------------------------------
def test_predict_matches_local_engine_then_resumes(ray_cluster, fitted_model, inputs, local_predictions, tmp_path,
                                                   capsys):
    out = tmp_path / "ray"
    first = tmp_path / "first.txt"  # a list file holding 5 of the images: the "interrupted" first run
    first.write_text("\n".join(os.path.relpath(p, tmp_path) for p in sorted(inputs.iterdir())[:5]) + "\n")
    code, stdout, err = _run(capsys, ["predict", "--model", str(fitted_model), str(first), "--out", str(out),
                                      "--engine", "ray", "--workers", "1", "--batch-size", "2"])
    assert code == 0, err
    assert len(_rows(out)) == 5
    code, stdout, err = _run(capsys, ["predict", "--model", str(fitted_model), str(inputs), "--out", str(out),
                                      "--engine", "ray", "--workers", "2", "--batch-size", "2", "--images"])
    assert code == 1 and "zz_corrupt.png" in err and "Traceback" not in err
    assert "scored 12 images" in stdout and "skipped 5" in stdout, stdout
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(local_predictions)  # every input exactly once
    _assert_equal_to_local(rows, local_predictions)
    import pyarrow.parquet as pq

    assert pq.read_table(out / "predictions.parquet").num_rows == 17
    pictures = list(out.glob("*_overlay.png"))
    assert 0 < len(pictures) <= 17 and len(list(out.glob("*_mask.png"))) == len(pictures)


def _kill_first_marked_actor(folder: Path, done: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first scoring actor that marks a batch as started in `folder` (it is then waiting inside
    that batch), then release every actor. Gives up only at `HANG_GUARD_S` or when the run ends first."""
    guard = time.monotonic() + HANG_GUARD_S
    try:
        while not done.is_set() and time.monotonic() < guard:
            marked = sorted(folder.glob("*.started"))
            if marked:
                pid = int(marked[0].stem)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)
    finally:
        (folder / "release").touch()


def test_killed_actor_is_replaced_and_nothing_is_lost_or_doubled(ray_cluster, fitted_model, inputs, held_batches,
                                                                local_predictions, tmp_path):
    """An actor killed while it holds a batch (it marked the batch and waits for the test) is restarted, its
    block is redone, and every path is in the output once, scored as the local engine scores it."""
    from anomalyvfm.distributed.predict import predict_on_ray

    readable = [p for p in sorted(inputs.iterdir()) if p.name != "zz_corrupt.png"]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, readable)))
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_marked_actor, args=(held_batches, done, killed), daemon=True)
    killer.start()
    try:
        run = predict_on_ray(fitted_model, [str(listing)], tmp_path / "out", {"batch_size": 1}, workers=2)
    finally:
        done.set()
        killer.join()
    assert killed, f"no scoring actor marked a batch within the {HANG_GUARD_S} s hang guard"
    started = {int(p.stem) for p in held_batches.glob("*.started")}
    assert killed[0] in started and len(started) >= 3, f"no replacement actor scored a batch: {started}"
    rows = _rows(tmp_path / "out")
    assert run.scored == len(readable) and sorted(r["path"] for r in rows) == sorted(map(str, readable))
    _assert_equal_to_local(rows, local_predictions)


def test_results_of_another_model_are_refused_unless_overwrite(ray_cluster, fitted_model, inputs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(fitted_model, other)
    config = json.loads((other / "config.json").read_text())
    config["record"]["fitted_at"] = "2000-01-01T00:00:00+00:00"  # another fit: another identity, still loadable
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    image = str(sorted(inputs.glob("*.png"))[0])
    assert _run(capsys, ["predict", "--model", str(fitted_model), image, "--out", str(out), "--engine", "ray",
                         "--workers", "1"])[0] == 0
    code, _, err = _run(capsys, ["predict", "--model", str(other), image, "--out", str(out), "--engine", "ray"])
    assert code == 2 and "holds predictions of model" in err and err.count("\n") == 1
    # --overwrite (checked on the store itself: starting actors again would test nothing more)
    from anomalyvfm.distributed.results import ResultStore, model_identity

    import pyarrow as pa

    identity = model_identity(other, "distance")
    with pytest.raises(UserInputError, match="--overwrite"):
        ResultStore(out, identity, resume=True, overwrite=False)
    store = ResultStore(out, identity, resume=True, overwrite=True)
    assert store.done == set() and not (out / "predictions.csv").exists()
    assert json.loads((out / "model.json").read_text())["model"] == str(other)
    row = pa.table({"path": ["x.png"], "score": [0.5], "is_anomalous": [False], "error": [None]})
    store.add(row), store.add(row)  # a redelivered batch
    store.flush()
    store.add(row)
    store.flush()
    assert store.write_csv() == (1, 0)  # nothing twice
    assert ResultStore(out, identity, resume=True, overwrite=False).done == {"x.png"}  # the same model resumes
    assert ResultStore(out, identity, resume=False, overwrite=False).done == set()  # --no-resume starts afresh
def test_bad_input_is_one_line_exit_2(ray_cluster, fitted_model, inputs, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(fitted_model, damaged)
    (damaged / "head.safetensors").write_bytes(b"0" * 10)  # the driver reads config.json; workers must load all
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    image = str(sorted(inputs.glob("*.png"))[0])
    cases = [
        (["--model", str(fitted_model), image, "--address", "127.0.0.1:1"], "cannot reach a Ray cluster"),
        (["--model", str(damaged), image], "cannot be loaded on Ray node"),
        (["--model", str(fitted_model), str(empty)], "no images to score"),
        (["--model", str(tmp_path / "missing"), image], "cannot read the model"),
        (["--model", str(fitted_model), image, "--workers", "9"], "room for 2"),
    ]
    for argv, fragment in cases:
        code, _, err = _run(capsys, ["predict", *argv, "--out", str(tmp_path / "o"), "--engine", "ray"])
        assert code == 2 and fragment in err and err.count("\n") == 1, (argv, err)
    code, _, err = _run(capsys, ["predict", "--model", str(fitted_model), image, "--out", str(tmp_path / "l"),
                                 "--workers", "2"])
    assert code == 2 and "only apply with --engine ray" in err


# -- fit ------------------------------------------------------------------------------------------------
def _fit(capsys, data_root, backbone_dir, out, *extra):
    code, _, err = _run(capsys, ["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                                 "--image-size", "112", "--out", str(out), *extra])
    assert code == 0, err
    return out


def test_ray_fit_equals_local_fit(ray_cluster, data_root, backbone_dir, fitted_model, tmp_path, capsys):
    """Mahalanobis: the same model to 1e-5; kNN: the same image AUROC within 0.01 on the demo test split."""
    local = _fit(capsys, data_root, backbone_dir, tmp_path / "local", "--scorer", "mahalanobis")
    ray_fit = _fit(capsys, data_root, backbone_dir, tmp_path / "ray", "--scorer", "mahalanobis", "--engine", "ray",
                   "--workers", "2")
    a, b = load_file(local / "head.safetensors"), load_file(ray_fit / "head.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-5), key
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (local, ray_fit))
    assert ca["record"]["train_images"] == cb["record"]["train_images"]
    assert ca["settings"] == cb["settings"]
    knn = _fit(capsys, data_root, backbone_dir, tmp_path / "knn", "--engine", "ray", "--workers", "2")
    test = sorted((data_root / "demo" / "test_public").glob("*/*.png"))
    labels = [p.parent.name == "bad" for p in test]
    aurocs = [roc_auc_score(labels, [p.score for p in AnomalyDetector.load(m).predict(test, progress=False)])
              for m in (fitted_model, knn)]
    assert abs(aurocs[0] - aurocs[1]) <= 0.01, aurocs


def test_evaluate_on_ray_equals_local(ray_cluster, fitted_model, data_root, tmp_path, capsys):
    common = ["evaluate", "--model", str(fitted_model), "--data", str(data_root), "--category", "demo"]
    assert _run(capsys, [*common, "--out", str(tmp_path / "local")])[0] == 0
    code, _, err = _run(capsys, [*common, "--out", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"])
    assert code == 0, err
    local, ray = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "ray"))
    for key in local:
        if key == "intervals":
            for name, interval in local[key].items():
                assert interval == pytest.approx(ray[key][name], abs=1e-6), name
        elif key not in ("seconds", "peak_rss_mb", "images_per_second"):
            assert local[key] == (pytest.approx(ray[key], abs=1e-6) if key != "bootstrap" else ray[key]), key
