"""`fit --calibration-defects DIR`: thresholds set from a few labelled defects plus the normal images."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyvfm import metrics as M
from anomalyvfm.cli.main import main
from anomalyvfm.data import load_mask
from anomalyvfm.deploy.load import load_predictor
from anomalyvfm.detector import model_dir
from anomalyvfm.detector.defect_thresholds import defect_thresholds


def test_the_thresholds_separate_normal_images_from_the_labelled_defects():
    rng = np.random.default_rng(0)
    normal_maps = [rng.uniform(0, 0.4, (8, 8)) for _ in range(5)]
    masks = [np.zeros((8, 8), bool) for _ in range(3)]
    defect_maps = [rng.uniform(0, 0.4, (8, 8)) for _ in range(3)]
    for mask, amap in zip(masks, defect_maps):
        mask[2:5, 2:5] = True
        amap[mask] = rng.uniform(0.6, 0.9, mask.sum())
    image_t, pixel_t, evidence = defect_thresholds(np.array([0.1, 0.2, 0.3, 0.25, 0.15]), normal_maps,
                                                   np.array([0.5, 0.7, 0.6]), defect_maps, masks)
    assert 0.3 <= image_t < 0.5 and evidence["image"]["f1"] == 1.0  # score > threshold flags: every defect, no normal
    normal_top = max(m.max() for m in normal_maps + [a[~k] for a, k in zip(defect_maps, masks)])
    assert normal_top <= pixel_t < min(a[k].min() for a, k in zip(defect_maps, masks)) and evidence["pixel"]["f1"] == 1.0
    assert evidence["pixel"]["rule"] == "defects" and "3 labelled defects" in evidence["pixel"]["text"]


def test_fit_with_calibration_defects_records_them_and_outlines_them_better(backbone_dir, data_root, fitted_model,
                                                                           tmp_path, capsys):
    defects = data_root / "demo" / "test_public"
    out = tmp_path / "with-defects"
    assert main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--calibration-defects", str(defects), "--out", str(out)]) == 0
    assert "labelled defects" in capsys.readouterr().out
    stored = model_dir.read(out)
    assert stored.record.calibration_defects["images"] == 8
    t = stored.calibration.thresholds()
    assert t.evidence["image"]["rule"] == t.evidence["pixel"]["rule"] == "defects"
    images = sorted((defects / "bad").glob("*.png"))
    masks = [load_mask(defects / "ground_truth" / "bad" / f"{p.stem}_mask.png") for p in images]

    def seg_f1(model: Path) -> float:
        predictor = load_predictor(model)
        preds = predictor.predict(images, progress=False)
        return M.seg_f1(masks, [p.anomaly_map for p in preds], predictor.thresholds().pixel_threshold)

    assert seg_f1(out) >= seg_f1(fitted_model)  # on the very defects it was set from: at least as good


def _defects(tmp_path: Path, data_root: Path) -> Path:
    folder = tmp_path / "defects"
    shutil.copytree(data_root / "demo" / "test_public", folder)
    return folder


@pytest.mark.parametrize("damage, named", [
    ("no bad folder", "no bad/ folder"),
    ("empty", "no images found"),
    ("missing mask", "001_regular.png: no mask"),
    ("small mask", "001_regular_mask.png: mask is"),
    ("empty mask", "001_regular_mask.png: the mask outlines nothing"),
])
def test_bad_calibration_defects_are_one_line_naming_the_file(damage, named, backbone_dir, data_root, tmp_path, capsys):
    folder = _defects(tmp_path, data_root)
    mask = folder / "ground_truth" / "bad" / "001_regular_mask.png"
    if damage == "no bad folder":
        shutil.rmtree(folder / "bad")
    elif damage == "empty":
        for image in (folder / "bad").iterdir():
            image.unlink()
    elif damage == "missing mask":
        mask.unlink()
    elif damage == "small mask":
        Image.open(mask).resize((10, 10)).save(mask)
    else:
        Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape, np.uint8)).save(mask)
    out = tmp_path / "model"
    code = main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--calibration-defects", str(folder), "--out", str(out)])
    err = capsys.readouterr().err.strip().split("\r")[-1].splitlines()[-1]
    assert code == 2 and err.startswith("anomalyvfm: error:") and named in err, err
    assert not out.exists()
