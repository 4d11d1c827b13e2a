"""The line loop: `anomalyvfm update` learns confirmed-good images without a refit, and `serve` picks up the new
version (`POST /admin/reload`, SIGHUP) without dropping a request.

A "new normal appearance" is the demo texture with other stripes: the fitted model flags it, an operator
labels it good, and after the update the same appearance — other images of it than the ones added — scores
lower, while the labelled defects stay flagged. Real SQLite stores, a real uvicorn server, a real `serve`
process; requests in flight are held in the backbone (`Gate`) rather than timed.
"""
from __future__ import annotations

import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from servers import free_port, live_server, png, serve_process, wait_for, wait_for_line, wait_until_serving
from test_reliability import gated, post_image

from anomalyvfm.cli.main import main
from anomalyvfm.deploy.load import load_predictor
from anomalyvfm.deploy.update import fewest_errors, threshold_from_labels
from anomalyvfm.detector import model_dir
from anomalyvfm.head.calibration import Thresholds
from anomalyvfm.head.update import grown_gaussian, merge_into_bank
from anomalyvfm.scoring.distances import knn_distance, unit_rows
from anomalyvfm.service.app import create_app
from anomalyvfm.store import open_store


def variant_image(rng: np.random.Generator, height: int = 112, width: int = 154) -> np.ndarray:
    """The demo's brushed surface with wider vertical and finer horizontal stripes: good, but unseen."""
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 30 * np.sin(x / 7.0 + rng.uniform(0, 2 * np.pi)) + 10 * np.sin(y / 3.0) + rng.normal(0, 6, (height, width))
    return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """Two groups of the new appearance: the first is labelled good and added, the second only scored."""
    folder, rng = tmp_path_factory.mktemp("variants"), np.random.default_rng(3)
    paths = []
    for i in range(8):
        paths.append(folder / ("added" if i < 4 else "later") / f"v{i}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(variant_image(rng)).save(paths[-1])
    return paths[:4], paths[4:]


def scores(model: Path, paths: list[Path], **runtime) -> np.ndarray:
    return np.array([p.score for p in load_predictor(model, **runtime).predict(paths, progress=False)])


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- the arithmetic ---------------------------------------------------------------------------------
def test_bank_merge_adds_the_least_covered_patches_first_and_nothing_already_held():
    rng = np.random.default_rng(0)
    bank = unit_rows(rng.normal(size=(50, 16)).astype(np.float32))
    novel = rng.normal(size=(40, 16)).astype(np.float32)
    chosen = merge_into_bank(bank, novel, 0.25)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    assert chosen[0] == int(np.argmax(knn_distance(novel, bank)))  # the patch farthest from the bank comes first
    grown = np.concatenate([bank, unit_rows(novel[chosen])])
    left = np.setdiff1d(np.arange(40), chosen)
    # farthest-first: every patch left out is at least as close to the grown bank as the last one taken was
    last_gap = knn_distance(novel[chosen[-1:]], np.concatenate([bank, unit_rows(novel[chosen[:-1]])]))[0]
    assert knn_distance(novel[left], grown).max() <= last_gap + 1e-6
    assert len(merge_into_bank(bank, bank[:7] * 3.0, 0.5)) == 0  # already in the bank: nothing to add


def test_grown_gaussian_has_the_moments_of_all_patches():
    """With an unshrunk prior, growing the Gaussian equals fitting it on every patch at once."""
    rng = np.random.default_rng(1)
    first, second = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)), rng.normal(2.0, 1.5, size=(100, 6))
    mean, cov = first.mean(0), np.cov(first, rowvar=False)
    whitener = np.linalg.cholesky(np.linalg.inv(cov))
    new_mean, new_whitener = grown_gaussian(mean.astype(np.float32), whitener.astype(np.float32), len(first),
                                            second.sum(0), second.T @ second, len(second))
    both = np.concatenate([first, second])
    np.testing.assert_allclose(new_mean, both.mean(0), rtol=1e-4, atol=1e-5)
    covariance = np.linalg.inv(new_whitener.astype(np.float64) @ new_whitener.T.astype(np.float64))
    np.testing.assert_allclose(covariance, np.cov(both, rowvar=False), rtol=1e-3, atol=1e-4)


def test_labelled_defects_set_the_threshold_that_misjudges_fewest():
    from anomalyvfm.deploy.update import Labelled

    normal = {"validation": {"image": [0.1, 0.2, 0.3, 0.55], "map_max": [0.0] * 4},
              "added": {"image": [0.45], "map_max": [0.0]}}
    t = Thresholds(0.5, 0.3, {}, normal_samples=normal)
    defects = [(Labelled(Path(f"{v}.png"), "defect"), v) for v in (0.4, 0.6, 0.7)]
    new, passed = threshold_from_labels(t, defects)
    # between 0.55 and 0.6 only the defect at 0.4 is misjudged; every other cut misjudges two or more
    assert new.image_threshold == pytest.approx(0.575) and passed == ["0.4.png"] and "labels" in new.evidence
    # a tie (one error at 0.2 and at 0.6) goes to the cut nearest the threshold in force
    assert fewest_errors(np.array([0.1, 0.5]), np.array([0.3, 0.7]), 0.5) == pytest.approx(0.6)
    assert fewest_errors(np.array([0.1, 0.5]), np.array([0.3, 0.7]), 0.1) == pytest.approx(0.2)
    assert threshold_from_labels(t, []) == (t, [])


# -- anomalyvfm update ------------------------------------------------------------------------------
def test_update_from_store_labels_learns_the_new_appearance(fitted_model, data_root, variants, tmp_path, capsys):
    added, later = variants
    defects = sorted((data_root / "demo" / "test_public" / "bad").glob("*.png"))[:3]
    db = tmp_path / "results.db"
    assert main(["predict", "--model", str(fitted_model), *map(str, added + defects), "--out", str(tmp_path / "p"),
                 "--store", str(db)]) == 0
    store = open_store(str(db))
    records = {Path(r["source"]).name: r for r in store.find(limit=100)[0]}
    assert all(records[p.name]["is_anomalous"] for p in added + defects)  # the new appearance is a false alarm
    for p in added:
        store.set_label(records[p.name]["id"], "good", by="operator")
    for p in defects:
        store.set_label(records[p.name]["id"], "defect")
    store.close()
    before = files_of(fitted_model)
    out = tmp_path / "m2"
    assert main(["update", "--model", str(fitted_model), "--store", str(db), "--out", str(out)]) == 0
    assert "from 4 good and 3 defect images" in capsys.readouterr().out
    assert files_of(fitted_model) == before  # the parent is untouched
    parent, child = model_dir.read(fitted_model), model_dir.read(out)
    lineage = child.record.updates[-1]
    assert child.version != parent.version and lineage["parent_version"] == parent.version
    assert sorted(lineage["inspections"]) == sorted(records[p.name]["id"] for p in added + defects)
    assert lineage["rows_added"][0] > 0 and len(child.head["view0.bank"]) == len(parent.head["view0.bank"]) + lineage["rows_added"][0]
    assert len(child.calibration.thresholds().normal_samples["added"]["image"]) == 4
    old, new = scores(fitted_model, later), scores(out, later)
    assert (new < old).all()  # images of the appearance that were never added score lower
    threshold = child.calibration.thresholds().image_threshold
    assert (scores(out, defects) > threshold).all()  # labelled defects stay flagged
    # the same labels again: nothing new to learn, one line, nothing written
    again = tmp_path / "m3"
    assert main(["update", "--model", str(out), "--store", str(db), "--out", str(again)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anomalyvfm: error: nothing to learn") and "\n" not in err and not again.exists()


def test_update_with_a_folder_of_good_images_through_an_exported_form(fitted_model, variants, tmp_path):
    """A line PC's model (graph form, no torch weights) is updated the same way; the torch model scores alike."""
    pytest.importorskip("onnxruntime")
    added, later = variants
    good = good_folder(added, tmp_path / "good")
    model = tmp_path / "with-form"
    assert main(["export", "--model", str(fitted_model), "--out", str(model), "--format", "onnx",
                 "--precision", "fp32"]) == 0
    out = tmp_path / "updated"
    assert main(["update", "--model", str(model), "--good", str(good), "--out", str(out), "--runtime", "onnx"]) == 0
    updated = model_dir.read(out)
    assert "onnx-fp32" in updated.forms and updated.record.updates[-1]["source"] == f"folder {good}"
    assert (scores(out, later, backend="onnx") < scores(model, later, backend="onnx")).all()
    torch_updated = tmp_path / "torch-updated"
    assert main(["update", "--model", str(fitted_model), "--good", str(good), "--out", str(torch_updated)]) == 0
    np.testing.assert_allclose(scores(out, later, backend="onnx"), scores(torch_updated, later), rtol=1e-3)


def good_folder(images: list[Path], folder: Path) -> Path:
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    return folder


def fit_and_update(backbone_dir: Path, data_root: Path, added: list[Path], tmp_path: Path,
                   *options: str) -> tuple[model_dir.StoredModel, model_dir.StoredModel]:
    """A model fitted on the demo data with `options`, and its update with `added` (both read back)."""
    model, out = tmp_path / "model", tmp_path / "updated"
    assert main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 *options, "--out", str(model)]) == 0
    good = good_folder(added, tmp_path / "good")
    assert main(["update", "--model", str(model), "--good", str(good), "--out", str(out)]) == 0
    return model_dir.read(model), model_dir.read(out)


def test_update_a_mahalanobis_model(backbone_dir, data_root, variants, tmp_path):
    added, later = variants
    parent, child = fit_and_update(backbone_dir, data_root, added, tmp_path, "--image-size", "112",
                                   "--scorer", "mahalanobis")
    assert not np.allclose(parent.head["view0.mean"], child.head["view0.mean"])
    assert (scores(child.directory, later) < scores(parent.directory, later)).all()


def test_update_a_multiscale_model_with_global_evidence(backbone_dir, data_root, variants, tmp_path):
    """Every view's bank grows, and the global embeddings take one row per added image."""
    added, later = variants
    parent, child = fit_and_update(backbone_dir, data_root, added, tmp_path, "--scales", "84", "112",
                                   "--image-evidence", "patch+global")
    rows = child.record.updates[-1]["rows_added"]
    assert len(rows) == 2 and all(n > 0 for n in rows)
    for view in (0, 1):
        assert len(child.head[f"view{view}.bank"]) == len(parent.head[f"view{view}.bank"]) + rows[view]
    assert len(child.head["global.embeddings"]) == len(parent.head["global.embeddings"]) + len(added)
    assert (scores(child.directory, later) < scores(parent.directory, later)).all()


def test_update_bad_input_is_one_line_and_writes_nothing(fitted_model, tmp_path, capsys):
    empty_db = tmp_path / "empty.db"
    open_store(str(empty_db)).close()
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    cases = [
        ([], "needs --store URL"),
        (["--store", str(tmp_path / "missing.db")], "missing.db"),
        (["--store", str(empty_db)], "nothing to learn"),
        (["--good", str(empty)], "no images found"),
        (["--good", str(tmp_path / "nowhere")], "is not a folder"),
        (["--good", str(broken)], "bad.png"),
    ]
    for extra, expected in cases:
        assert main(["update", "--model", str(fitted_model), "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err.strip().split("\r")[-1].splitlines()[-1]  # after any progress bar
        assert err.startswith("anomalyvfm: error:") and expected in err, (extra, err)
        assert not out.exists()


# -- serve: reload --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def updated_model(fitted_model, variants, tmp_path_factory) -> Path:
    good = good_folder(variants[0], tmp_path_factory.mktemp("good") / "good")
    out = tmp_path_factory.mktemp("updated") / "model"
    assert main(["update", "--model", str(fitted_model), "--good", str(good), "--out", str(out)]) == 0
    return out


def test_reload_swaps_versions_between_batches_and_records_say_which_judged(fitted_model, updated_model, variants,
                                                                           tmp_path):
    """The request inside the backbone when the reload lands is answered and recorded by the old version; the
    next one by the new; a model that cannot be loaded is 422 and the old one keeps serving."""
    store = open_store(str(tmp_path / "results.db"))
    app = create_app(fitted_model, store=store)
    gate, image = gated(app), png(np.asarray(Image.open(variants[1][0])))
    old, new = model_dir.read(fitted_model).version, model_dir.read(updated_model).version
    with live_server(app) as base, ThreadPoolExecutor(2) as pool:
        gate.hold.clear()
        in_flight = pool.submit(post_image, base, image, "first.png")
        wait_for(lambda: gate.holding > 0, "the first image inside the backbone")
        reloaded = requests.post(base + "/admin/reload", json={"model": str(updated_model)}, timeout=120)
        assert reloaded.status_code == 200 and reloaded.json() == {"model": "model", "model_version": new,
                                                                  "previous_version": old}
        gate.hold.set()
        first = in_flight.result()
        second = post_image(base, image, "second.png")
        refused = requests.post(base + "/admin/reload", json={"model": str(tmp_path / "nowhere")}, timeout=60)
        third = post_image(base, image, "third.png")
        card = requests.get(base + "/model", timeout=10).json()
    store.close()
    assert first.json()["model_version"] == old and second.json()["model_version"] == new
    assert second.json()["score"] < first.json()["score"]
    assert refused.status_code == 422 and "still serving" in refused.json()["detail"]
    assert third.json()["model_version"] == new and card["model_version"] == new and card["updates"]
    records = {r["source"]: r["model_version"] for r in open_store(str(tmp_path / "results.db")).find()[0]}
    assert records == {"first.png": old, "second.png": new, "third.png": new}


def test_reload_needs_the_api_key(fitted_model):
    app = create_app(fitted_model, api_key="secret")
    with live_server(app) as base:
        assert requests.post(base + "/admin/reload", timeout=10).status_code == 401
        ok = requests.post(base + "/admin/reload", headers={"X-API-Key": "secret"}, timeout=120)
    assert ok.status_code == 200 and ok.json()["model_version"] == ok.json()["previous_version"]


def test_sighup_reloads_the_served_directory(fitted_model, updated_model, variants, tmp_path):
    """`systemctl reload`: `update --out` replaced the served folder; SIGHUP makes serve judge with it."""
    served = tmp_path / "served"
    shutil.copytree(fitted_model, served)
    port = free_port()
    process, lines = serve_process(served, port)
    base, image, seen = f"http://127.0.0.1:{port}", png(np.asarray(Image.open(variants[1][0]))), []
    try:
        wait_until_serving(process, base)
        before = post_image(base, image).json()
        stored = model_dir.read(updated_model)
        model_dir.write(served, stored, copy_from=updated_model)  # an update written over the served folder
        process.send_signal(signal.SIGHUP)
        wait_for_line(lines, seen, '"event": "reload"')
        after = post_image(base, image).json()
        assert process.poll() is None  # still serving: SIGHUP is not an exit
    finally:
        process.terminate()
        process.wait(60)
    assert before["model_version"] != after["model_version"] == stored.version
    assert after["score"] < before["score"]
    assert "Traceback" not in "".join(seen)
