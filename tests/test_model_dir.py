"""Model directories: format-1 compatibility, portability, atomic writes, and one-line errors for damage."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from anomalyvfm import AnomalyDetector
from anomalyvfm.cli.main import main
from anomalyvfm.data import load_dataset
from anomalyvfm.demo import make_random_backbone
from anomalyvfm.detector import model_dir
from anomalyvfm.detector import pipeline as pipeline_module

FIXTURES = Path(__file__).parent / "fixtures"


def _test_paths(data_root: Path) -> list[Path]:
    return [s.path for s in load_dataset(data_root, "demo").split("test_public")]


@pytest.mark.parametrize("name, modes", [("knn_v1", ["distance"]), ("lora_v1", ["fusion", "head", "distance"])])
def test_format_1_directories_load_and_score_as_version_0_1_did(name, modes, backbone_dir, data_root, one_thread):
    expected = json.loads((FIXTURES / "expected.json").read_text())
    paths = _test_paths(data_root)
    for mode in modes:
        detector = AnomalyDetector.load(FIXTURES / name, backbone=backbone_dir, score=mode)
        for path, pred in zip(paths, detector.predict(paths, progress=False)):
            score, map_sum, mask_pixels, anomalous = expected[f"{name}/{mode}"][f"{path.parent.name}/{path.name}"]
            # 0.1 computed its resize weights in torch's float32; the numpy resize shared with exported
            # bundles computes them in float64 (2.5e-5 of the value range), hence not bit-identical
            assert pred.score == pytest.approx(score, rel=1e-4, abs=5e-5)
            assert float(pred.anomaly_map.sum()) == pytest.approx(map_sum, rel=1e-4, abs=0.05)
            assert abs(int(pred.mask.sum()) - mask_pixels) <= 0.001 * pred.mask.size and pred.is_anomalous == anomalous
    assert AnomalyDetector.load(FIXTURES / name, backbone=backbone_dir).score_mode == modes[0]


def test_format_1_is_written_back_as_format_3(backbone_dir, data_root, tmp_path, one_thread):
    old = AnomalyDetector.load(FIXTURES / "lora_v1", backbone=backbone_dir)
    config = json.loads(old.save(tmp_path / "m").joinpath("config.json").read_text())
    assert config["format_version"] == model_dir.FORMAT_VERSION and config["settings"]["lora"]["crop_size"] == 56
    paths = _test_paths(data_root)[::4]
    again = AnomalyDetector.load(tmp_path / "m")
    assert [p.score for p in again.predict(paths, progress=False)] == [p.score for p in old.predict(paths, progress=False)]


def test_fitted_and_loaded_models_are_the_same_model(fitted_model, backbone_dir, data_root, tmp_path, one_thread):
    """Settings, calibration, record and every output of a fitted detector survive save + load."""
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, foreground="on", coreset_ratio=0.3)
    detector.fit([s.path for s in load_dataset(data_root, "demo").split("train")],
                 [s.path for s in load_dataset(data_root, "demo").split("validation")], progress=False)
    loaded = AnomalyDetector.load(detector.save(tmp_path / "m"))
    assert loaded.settings == detector.settings and loaded.calibration == detector.calibration
    assert loaded.record == detector.record and loaded.summary() == detector.summary()
    paths = _test_paths(data_root)
    for a, b in zip(detector.predict(paths, progress=False), loaded.predict(paths, progress=False)):
        assert a.score == b.score and a.is_anomalous == b.is_anomalous
        assert np.array_equal(a.anomaly_map, b.anomaly_map) and np.array_equal(a.mask, b.mask)


def test_a_copied_directory_runs_without_the_original_backbone(data_root, tmp_path, one_thread):
    backbone = make_random_backbone(tmp_path / "backbone-that-goes-away", seed=3)
    detector = AnomalyDetector(backbone=str(backbone), image_size=56)
    detector.fit([s.path for s in load_dataset(data_root, "demo").split("train")][:6], progress=False)
    saved = detector.save(tmp_path / "here" / "model")
    assert (saved / model_dir.BACKBONE_DIR / "model.safetensors").is_file()
    copy = shutil.copytree(saved, tmp_path / "line-pc" / "model")
    shutil.rmtree(backbone)
    paths = _test_paths(data_root)[:3]
    assert [p.score for p in AnomalyDetector.load(copy).predict(paths, progress=False)] == \
        [p.score for p in detector.predict(paths, progress=False)]


def test_reference_only_directories_need_their_backbone(fitted_model, backbone_dir, data_root, tmp_path, capsys):
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir), "--image-size",
                 "56", "--max-train-images", "4", "--reference-backbone", "--out", str(tmp_path / "ref")])
    assert code == 0 and not (tmp_path / "ref" / model_dir.BACKBONE_DIR).exists()
    stored = AnomalyDetector.load(fitted_model)
    size = sum(p.stat().st_size for p in (tmp_path / "ref").rglob("*") if p.is_file())
    assert size < sum(p.stat().st_size for p in fitted_model.rglob("*") if p.is_file())
    assert AnomalyDetector.load(tmp_path / "ref").settings.backbone == str(backbone_dir.resolve())
    assert stored.pipeline.backbone_source == str(fitted_model / model_dir.BACKBONE_DIR)


@pytest.mark.parametrize("owner, step", [(model_dir, "save_file"), (pipeline_module, "save_blocks"), (model_dir, "_checksums"),
                                         (model_dir, "_sync"), (model_dir, "_swap_into_place")])
def test_a_failure_at_any_step_leaves_the_old_model_intact(owner, step, fitted_model, data_root, tmp_path, monkeypatch):
    target = shutil.copytree(fitted_model, tmp_path / "model")
    paths = _test_paths(data_root)[:2]
    before = [p.score for p in AnomalyDetector.load(target).predict(paths, progress=False)]
    detector = AnomalyDetector.load(target)

    def fail(*args, **kwargs):
        raise OSError(f"disk full during {step}")

    monkeypatch.setattr(owner, step, fail)
    with pytest.raises(OSError, match="disk full"):
        detector.save(target)
    assert [p.score for p in AnomalyDetector.load(target).predict(paths, progress=False)] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


def test_a_kill_between_steps_never_leaves_a_mix(fitted_model, tmp_path):
    """A process killed (os._exit, no cleanup) right before the swap leaves the old directory untouched."""
    target = shutil.copytree(fitted_model, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    script = textwrap.dedent(f"""
        import os
        from anomalyvfm import AnomalyDetector
        from anomalyvfm.detector import model_dir
        model_dir._swap_into_place = lambda new, target: os._exit(9)
        AnomalyDetector.load({str(target)!r}).save({str(target)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    model_dir.read(target)  # still a valid, verified model


def _damage(model: Path, case: str) -> None:
    config = json.loads((model / "config.json").read_text())
    scorer = model / model_dir.HEAD_FILE
    if case == "truncated scorer":
        scorer.write_bytes(scorer.read_bytes()[: scorer.stat().st_size // 2])
    elif case == "empty scorer":
        scorer.write_bytes(b"")
    elif case == "random scorer":
        scorer.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "config is a list":
        (model / "config.json").write_text("[1, 2]")
    elif case == "image_size is text":
        config["settings"]["image_size"] = "112"
    elif case == "negative sigma":
        config["settings"]["sigma"] = -4
    elif case == "missing threshold":
        del config["calibration"]["modes"]["distance"]["image_threshold"]
    elif case == "unknown key":
        config["settings"]["sigmaa"] = 4.0
    elif case == "newer format":
        config["format_version"] = 99
    elif case == "swapped scorer (checksum)":
        save_file({"view0.mean": load_file(scorer)["view0.bank"][0].contiguous(), "view0.whitener": load_file(scorer)["view0.bank"]}, str(scorer))
    elif case == "swapped scorer (no manifest)":
        save_file({"view0.mean": load_file(scorer)["view0.bank"][0].contiguous()}, str(scorer))
        del config["files"]
    elif case == "missing backbone weights":
        (model / "backbone" / "model.safetensors").unlink()
    elif case == "emptied file list":  # once switched every checksum off
        config["files"] = {}
    elif case == "file list without the scorer":
        del config["files"]["head.safetensors"]
    if case not in ("config is a list",):
        (model / "config.json").write_text(json.dumps(config))


CASES = ["truncated scorer", "empty scorer", "random scorer", "config is a list", "image_size is text",
         "negative sigma", "missing threshold", "unknown key", "newer format", "swapped scorer (checksum)",
         "swapped scorer (no manifest)", "missing backbone weights", "emptied file list", "file list without the scorer"]
FRAGMENTS = {"newer format": "upgrade", "unknown key": "sigmaa", "negative sigma": "sigma must be at least 0",
             "image_size is text": "image_size must be int", "missing backbone weights": "missing",
             "emptied file list": "lists no checksum for head.safetensors, backbone/model.safetensors",
             "file list without the scorer": "lists no checksum for head.safetensors"}


@pytest.mark.parametrize("case", CASES)
def test_damaged_directories_give_one_line_and_exit_2(case, fitted_model, data_root, tmp_path, capsys):
    model = shutil.copytree(fitted_model, tmp_path / "model")
    _damage(model, case)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    commands = [["predict", "--model", str(model), str(data_root / "demo" / "test_public" / "bad"), "--out",
                 str(tmp_path / "p")],
                ["evaluate", "--model", str(model), "--data", str(data_root), "--category", "demo", "--out", str(tmp_path / "e")],
                ["export-submission", "--model", str(model), "--data", str(data_root), "--category", "demo",
                 "--out", str(tmp_path / "s")],
                ["serve", "--model", str(model), "--port", port]]
    for argv in commands:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert str(model) in err and FRAGMENTS.get(case, "") in err, err


@pytest.mark.parametrize("kind, fragment", [("file", "exists and is not a folder"), ("folder", "not a model directory"),
                                           ("proc", "cannot create the model folder there")])
def test_an_unusable_out_fails_before_the_fit(kind, fragment, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    if kind == "proc":  # a folder that cannot be created
        out = Path("/proc/anomalyvfm-test/model")
    elif kind == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "holiday.jpg").write_bytes(b"not to be deleted")
    # the backbone does not exist: had the fit started, the error would name it instead
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(tmp_path / "none"),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert kind == "proc" or out.is_file() or (out / "holiday.jpg").read_bytes() == b"not to be deleted"


def test_a_full_disk_while_saving_the_model_is_one_line(backbone_dir, data_root, tmp_path, monkeypatch, capsys):
    """The fit is done, the disk fills while its files are written: one line, and the old model stays."""
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_dir, "_sync", full)
    out = tmp_path / "model"
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--max-train-images", "4", "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "anomalyvfm" in line]  # the rest is progress bars
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert f"{out}: cannot write (No space left on device); the model there, if any, is unchanged" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary folder left behind


@pytest.mark.parametrize("name", ["knn_v2", "bundle_v1"])
def test_format_2_models_and_earlier_bundles_score_as_they_did(name, backbone_dir, data_root, one_thread):
    """Fixtures written by the code before format 3 (tests/fixtures/README.md) give the scores they gave then."""
    expected = json.loads((FIXTURES / "expected_v2.json").read_text())[name]
    if name == "bundle_v1":
        pytest.importorskip("onnxruntime")
        from anomalyvfm.deploy.load import load_predictor

        predictor = load_predictor(FIXTURES / name)
    else:
        predictor = AnomalyDetector.load(FIXTURES / name, backbone=backbone_dir)
    # The bundle's backbone runs in ONNX Runtime, whose kernels differ by CPU (the fixture was recorded on an
    # AMD EPYC; a Xeon with AMX moves features by ~1e-7, and a patch at the edge of the top 1 % or a near tie
    # of global neighbours then moves an image score by up to ~4e-5 relative). Torch runs the same everywhere.
    score_tolerance = 1e-4 if name == "bundle_v1" else 1e-6
    paths = _test_paths(data_root)
    for path, pred in zip(paths, predictor.predict(paths, progress=False)):
        score, map_sum, mask_pixels, anomalous = expected[f"{path.parent.name}/{path.name}"]
        assert pred.score == pytest.approx(score, rel=score_tolerance)
        assert float(pred.anomaly_map.sum(dtype=np.float64)) == pytest.approx(map_sum, rel=1e-6)
        assert int(pred.mask.sum()) == mask_pixels and pred.is_anomalous == anomalous


def test_the_model_version_follows_what_decides_a_verdict(fitted_model, tmp_path):
    """Copying a model (as `export` does when it adds a form) keeps its version; new thresholds change it."""
    from dataclasses import replace

    stored = model_dir.read(fitted_model)
    assert len(stored.version) == 12
    copy = model_dir.read(model_dir.write(tmp_path / "copy", stored, copy_from=stored.directory))
    assert copy.version == stored.version
    mode = stored.calibration.mode
    moved = replace(stored.calibration.modes[mode], image_threshold=stored.calibration.modes[mode].image_threshold + 1)
    calibration = replace(stored.calibration, modes={**stored.calibration.modes, mode: moved})
    recalibrated = model_dir.read(model_dir.write(tmp_path / "new", replace(stored, calibration=calibration),
                                                  copy_from=stored.directory))
    assert recalibrated.version != stored.version
