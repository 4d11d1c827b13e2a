"""Multi-scale fusion, foreground guidance, --auto and benchmark variants."""
import csv
import json
import shutil

import numpy as np
import pytest

from anomalyvfm import AnomalyDetector
from anomalyvfm.cli.main import main
from anomalyvfm.data import load_dataset
from anomalyvfm.demo import textured_image
from anomalyvfm.scoring.distances import suppress_background


pytestmark = pytest.mark.usefixtures("one_thread")


def _split(data_root, name):
    return [s.path for s in load_dataset(data_root, "demo").split(name)]


def _object(rng, height=112, width=140):
    """A textured ellipse (the part) near the centre of a dark, smooth background."""
    image = textured_image(rng, height, width)
    y, x = np.mgrid[0:height, 0:width]
    cy, cx = height / 2 + rng.uniform(-5, 5), width / 2 + rng.uniform(-5, 5)
    part = ((y - cy) / (0.35 * height)) ** 2 + ((x - cx) / (0.3 * width)) ** 2 <= 1
    image[~part] = np.clip(20 + rng.normal(0, 3, (~part).sum()), 0, 255).astype(np.uint8)[:, None]
    return image


@pytest.mark.parametrize("settings", [{"scales": (56, 84)},
                                      {"tile_size": 56, "tile_overlap": 14, "tile_scale": 0.75, "foreground": "on"}])
def test_new_settings_survive_save_and_load(settings, backbone_dir, data_root, tmp_path):
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=56, **settings)
    detector.fit(_split(data_root, "train"), _split(data_root, "validation"), progress=False)
    paths = _split(data_root, "test_public")[::4]
    before = detector.predict(paths, progress=False)
    loaded = AnomalyDetector.load(detector.save(tmp_path / "m"))
    after = loaded.predict(paths, progress=False)
    assert [p.score for p in before] == [p.score for p in after]
    assert all(np.array_equal(a.anomaly_map, b.anomaly_map) for a, b in zip(before, after))
    assert all(p.anomaly_map.shape == (112, 154) for p in after)
    for key, value in settings.items():
        assert getattr(loaded.settings, key) == value
    head = loaded.pipeline.head.state_dict()
    assert sum(key.endswith(".bank") for key in head) == len(loaded.settings.views())
    assert ("foreground.mean" in head) == ("foreground" in settings)


def test_multiscale_standardises_views_before_averaging(backbone_dir, data_root):
    detector = AnomalyDetector(backbone=str(backbone_dir), scales=(84, 56))
    detector.fit(_split(data_root, "train"), _split(data_root, "validation"), progress=False)
    assert [size for size, _ in detector.settings.views()] == [56, 84]  # finest last: the fused grid is its grid
    assert len(detector.calibration.view_stats) == 2
    assert abs(detector.thresholds().validation_stats["pixel_score_mean"]) < 0.5  # z-scores, not raw distances
    items = next(iter(detector.pipeline.view_features(_split(data_root, "test_public")[:1], None)))
    scored = detector.pipeline.score_views(items)
    fused = detector.pipeline.head.fuse(scored, detector.calibration).distance
    assert fused.shape == items[-1].features.shape[:2] and scored.grids[0].shape != fused.shape


def test_suppression_caps_background_at_the_foreground_median():
    scores = np.array([[9.0, 1.0, 2.0, 3.0, 0.5]], np.float32)
    foreground = np.array([[False, False, False, True, True]])
    # column 2 is within one patch of the foreground and kept; 0 and 1 are capped at median(3, 0.5) = 0.5
    assert suppress_background(scores, foreground).tolist() == [[0.5, 0.5, 2.0, 3.0, 0.5]]


def test_foreground_auto_on_objects_off_on_textures(backbone_dir, data_root):
    rng = np.random.default_rng(0)
    objects = [_object(rng) for _ in range(10)]
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, foreground="auto")
    detector.fit(objects[:7], objects[7:9], progress=False)
    stats = detector.calibration.foreground
    assert stats["active"] and stats["centre"] > 0.9 and stats["border"] < 0.1 and stats["separability"] > 0.75
    mask = detector.pipeline.score_views(next(detector.pipeline.view_features(objects[9:], None))).foreground
    assert mask[3:5, 4:6].all() and not mask[0].any() and not mask[:, 0].any()  # the part, not the background
    spot = objects[9].copy()
    spot[5:20, 5:20] = 150  # smooth clutter on the background, not a defect of the part
    on = detector.predict([spot], progress=False)[0]
    detector.calibration.foreground["active"] = False
    off = detector.predict([spot], progress=False)[0]
    assert on.anomaly_map[5:20, 5:20].max() < 0.75 * off.anomaly_map[5:20, 5:20].max()
    texture = AnomalyDetector(backbone=str(backbone_dir), image_size=112, foreground="auto")
    texture.fit(_split(data_root, "train"), _split(data_root, "validation"), progress=False)
    assert texture.calibration.foreground["active"] is False


def test_auto_records_its_choice_and_never_reads_test_splits(backbone_dir, data_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    shutil.rmtree(data / "demo" / "test_public")
    for path in (data / "demo" / "test_private").iterdir():
        path.write_bytes(b"poison: reading this image would fail the fit")
    code = main(["fit", "--data", str(data), "--category", "demo", "--backbone", str(backbone_dir), "--image-size", "56",
                 "--auto", "--out", str(tmp_path / "m")])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    choice = config["record"]["auto_choice"]
    assert len(choice["candidates"]) == 12 and choice["validation_images"] == 5 and choice["synthetic_images"] == 3
    assert all(0 <= c["val_image_auroc"] <= 1 and 0 <= c["val_aupro_0.05"] <= 1 for c in choice["candidates"])
    best = max(choice["candidates"], key=lambda c: c["val_image_auroc"] + c["val_aupro_0.05"])
    assert choice["chosen"] == best["settings"]
    for key, value in choice["chosen"].items():
        assert config["settings"][key] == value
    evidence = choice["image_evidence"]  # chosen after the fit, on validation + local and global synthetic anomalies
    assert evidence["validation_images"] == 5 and evidence["synthetic_images"] == 6 * 1
    assert config["settings"]["image_evidence"] == evidence["chosen"] == max(
        evidence["figures"], key=lambda e: (evidence["figures"][e]["val_image_auroc"], e == "patch"))
    assert AnomalyDetector.load(tmp_path / "m").predict(_split(data_root, "validation")[:1], progress=False)[0].error is None


def test_benchmark_grid_writes_one_row_per_variant(backbone_dir, data_root, tmp_path, capsys):
    code = main(["benchmark", "--data", str(data_root), "--backbone", str(backbone_dir), "--image-size", "56",
                 "--max-train-images", "4", "--grid", "foreground=off,on", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    rows = [r for r in csv.DictReader(open(tmp_path / "results.csv")) if r["category"] != "mean"]
    assert [r["variant"] for r in rows] == ["foreground=off", "foreground=on"]
    assert "foreground off" in rows[0]["settings"] and "foreground on (applied)" in rows[1]["settings"]
    assert json.loads((tmp_path / "foreground=on" / "demo" / "model" / "config.json").read_text())["settings"]["foreground"] == "on"
    assert "| foreground=on | demo |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("extra, fragment", [
    (["fit", "--tile-size", "50"], "multiples of 14"),
    (["fit", "--tile-size", "448", "--tile-overlap", "448"], "overlap < size"),
    (["fit", "--tile-size", "448", "--scales", "448", "672"], "--scales needs"),
    (["fit", "--tile-size", "448", "--tile-scale", "0"], "--tile-scale must be positive"),
    (["benchmark", "--grid", "tile-size"], "--grid needs OPTION=V1,V2"),
    (["benchmark", "--variant", "x=--tile-size big"], "invalid int value: 'big'"),
])
def test_bad_view_options_give_one_line_and_exit_2(extra, fragment, data_root, backbone_dir, tmp_path, capsys):
    where = ["--category", "demo"] if extra[0] == "fit" else ["--categories", "demo"]
    code = main([*extra, *where, "--data", str(data_root), "--backbone", str(backbone_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_auto_tiles_only_where_they_add_native_detail():
    from anomalyvfm.detector.auto import candidate_views

    small = candidate_views(448, 272)  # magnetic_tile: 448 px already upscales; tiles would add no detail
    large = candidate_views(448, 1056)  # MVTec AD 2 sheet metal
    assert [v["tile_size"] for v in small] == [0, 0]
    assert large[-1]["tile_size"] == 448 and large[-1]["tile_scale"] == round(896 / 1056, 3)
