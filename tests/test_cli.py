import csv
import json

import numpy as np
import pytest
from PIL import Image

from anomalyvfm.cli.main import main
from anomalyvfm.outputs import output_names


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_writes_csv_overlays_and_masks(fitted_model, data_root, tmp_path, capsys):
    bad = data_root / "demo" / "test_public" / "bad"
    good = data_root / "demo" / "test_public" / "good" / "000_regular.png"
    code, out, err = _run(capsys, ["predict", "--model", str(fitted_model), str(bad), str(good), "--out", str(tmp_path)])
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 9 and set(rows[0]) == {"path", "score", "is_anomalous", "error"}
    assert sum(int(r["is_anomalous"]) for r in rows[:8]) >= 6
    names = output_names([p for p in sorted(bad.iterdir())] + [good])
    for name in names:
        overlay = Image.open(tmp_path / f"{name}_overlay.png")
        mask = np.asarray(Image.open(tmp_path / f"{name}_mask.png"))
        assert overlay.size == (154, 112) and mask.shape == (112, 154)
        assert set(np.unique(mask)) <= {0, 255}


def test_corrupt_images_are_reported_and_the_rest_scored(fitted_model, data_root, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    src = data_root / "demo" / "test_public" / "bad" / "000_regular.png"
    (inputs / "a_ok.png").write_bytes(src.read_bytes())
    (inputs / "b_empty.png").write_bytes(b"")
    (inputs / "c_truncated.png").write_bytes(src.read_bytes()[:200])
    (inputs / "d_ok.png").write_bytes(src.read_bytes())
    code, out, err = _run(capsys, ["predict", "--model", str(fitted_model), str(inputs), "--out", str(tmp_path / "o")])
    assert code == 1
    assert "b_empty.png" in err and "c_truncated.png" in err and "Traceback" not in err
    rows = list(csv.DictReader(open(tmp_path / "o" / "predictions.csv")))
    assert [bool(r["error"]) for r in rows] == [False, True, True, False]
    assert rows[0]["score"] == rows[3]["score"] != ""


def test_output_names_are_unique():
    from pathlib import Path

    names = output_names([Path("a/x.png"), Path("b/x.png"), Path("c/y.png"), Path("a/x.jpg")])
    assert len(set(names)) == 4 and names[2] == "y"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["fit", "--data", "{missing}", "--category", "demo", "--out", "{tmp}/m"], "no such data folder"),
        (["fit", "--data", "{data}", "--category", "nope", "--out", "{tmp}/m"], "unknown category 'nope'"),
        (["fit", "--data", "{data}", "--category", "demo", "--backbone", "{tmp}", "--out", "{tmp}/m"], "no config.json"),
        (["fit", "--data", "{empty}", "--category", "c", "--out", "{tmp}/m"], "no images found"),
        (["predict", "--model", "{empty}", "{images}", "--out", "{tmp}/o"], "not a model directory"),
        (["predict", "--model", "{model}", "{missing}", "--out", "{tmp}/o"], "no such file or folder"),
        (["predict", "--model", "{badmodel}", "{images}", "--out", "{tmp}/o"], "unreadable model directory"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(argv, fragment, fitted_model, data_root, backbone_dir, tmp_path, capsys):
    (tmp_path / "empty" / "c" / "train" / "good").mkdir(parents=True)
    bad_model = tmp_path / "badmodel"
    bad_model.mkdir()
    (bad_model / "config.json").write_text("{not json")
    (bad_model / "head.safetensors").write_bytes(b"")
    values = {"missing": tmp_path / "missing", "data": data_root, "tmp": tmp_path, "model": fitted_model,
              "empty": tmp_path / "empty", "badmodel": bad_model, "images": data_root / "demo" / "test_public" / "bad"}
    code, out, err = _run(capsys, [a.format(**values) for a in argv])
    assert code == 2
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_synth_preview_draws_a_grid(data_root, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["synth-preview", "--data", str(data_root), "--category", "demo", "--per-stage", "2", "--out", str(out)])
    assert code == 0
    grid = Image.open(out)
    assert grid.size[0] >= 2 * 100 and grid.size[1] >= 3 * 100
    code = main(["synth-preview", "--data", str(data_root), "--category", "demo", "--per-stage", "2", "--stages", "all",
                 "--out", str(out)])
    assert code == 0 and "14 synthetic anomalies" in capsys.readouterr().out
    assert Image.open(out).size[1] >= 7 * 100  # one row per stage: three local, the held-out perlin, three global


def test_max_train_images_limits_fit(backbone_dir, data_root, tmp_path, capsys):
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "56", "--max-train-images", "3", "--out", str(tmp_path / "m")])
    assert code == 0 and "(fit" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["record"]["train_images"] == 3


def test_relative_backbone_path_is_stored_absolute(backbone_dir, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(backbone_dir.parent)
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", backbone_dir.name,
                 "--image-size", "56", "--max-train-images", "3", "--out", str(tmp_path / "m")])
    assert code == 0
    stored = json.loads((tmp_path / "m" / "config.json").read_text())["settings"]["backbone"]
    assert stored == str(backbone_dir.resolve())
