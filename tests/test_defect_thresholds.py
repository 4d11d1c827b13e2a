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
from anomalyvfm.detector.defect_thresholds import CalibrationDefectsWarning, defect_thresholds
from anomalyvfm.detector.defects import DefectSet
from anomalyvfm.detector.detector import AnomalyDetector
from anomalyvfm.errors import UserInputError


def global_cut(amap: np.ndarray, pixel_t: float, flagged: bool) -> np.ndarray:
    return amap > pixel_t


def test_the_thresholds_separate_normal_images_from_the_labelled_defects():
    rng = np.random.default_rng(0)
    normal_maps = [rng.uniform(0, 0.4, (8, 8)) for _ in range(5)]
    masks = [np.zeros((8, 8), bool) for _ in range(3)]
    defect_maps = [rng.uniform(0, 0.4, (8, 8)) for _ in range(3)]
    for mask, amap in zip(masks, defect_maps):
        mask[2:5, 2:5] = True
        amap[mask] = rng.uniform(0.6, 0.9, mask.sum())
    image_t, pixel_t, evidence = defect_thresholds(np.array([0.1, 0.2, 0.3, 0.25, 0.15]), normal_maps,
                                                   np.array([0.5, 0.7, 0.6]), defect_maps, masks, global_cut, 0.2)
    assert 0.3 <= image_t < 0.5 and evidence["image"]["f1"] == 1.0  # score > threshold flags: every defect, no normal
    normal_top = max(m.max() for m in normal_maps + [a[~k] for a, k in zip(defect_maps, masks)])
    assert normal_top <= pixel_t < min(a[k].min() for a, k in zip(defect_maps, masks)) and evidence["pixel"]["f1"] == 1.0
    assert evidence["pixel"]["rule"] == "defects" and "3 labelled defects" in evidence["pixel"]["text"]


def test_the_pixel_threshold_is_judged_by_the_models_own_cut_not_a_global_one():
    """A cut whose regions start well above its threshold (as MEBin's per-image cut does above its floor): the
    best global threshold (just above the normal pixels) would lose most defect pixels; the normal-only one,
    lower, puts the cut where it separates them."""
    rng = np.random.default_rng(1)
    normal_maps = [rng.uniform(0, 0.4, (8, 8)) for _ in range(4)]
    masks, defect_maps = [np.zeros((8, 8), bool) for _ in range(3)], [rng.uniform(0, 0.4, (8, 8)) for _ in range(3)]
    for mask, amap in zip(masks, defect_maps):
        mask[1:6, 1:6] = True
        amap[mask] = rng.uniform(0.6, 0.9, mask.sum())

    def doubled(amap: np.ndarray, pixel_t: float, flagged: bool) -> np.ndarray:
        return amap > 2 * pixel_t

    global_t = M.seg_f1_max([np.zeros((8, 8), bool)] * 4 + masks, normal_maps + defect_maps)[1]
    assert M.seg_f1_masks(masks, [doubled(a, global_t, True) for a in defect_maps]) < 0.8
    _, pixel_t, evidence = defect_thresholds(np.full(4, 0.1), normal_maps, np.full(3, 0.9), defect_maps, masks,
                                             doubled, 0.25)
    assert pixel_t == 0.25 and evidence["pixel"]["f1"] == 1.0 and "normal-only 0.25" in evidence["pixel"]["text"]


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

    def seg_f1(model: Path) -> float:  # of the masks the model outputs (its own cut, outlines on rejected images)
        return M.seg_f1_masks(masks, [p.mask for p in load_predictor(model).predict(images, progress=False)])

    assert seg_f1(out) >= seg_f1(fitted_model)  # on the very defects it was set from: at least as good


def test_thresholds_from_few_defects_or_from_the_defects_the_model_learns_are_warned_of(backbone_dir, data_root, tmp_path, capsys):
    defects = data_root / "demo" / "test_public"
    assert main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--defects", str(defects), "--calibration-defects", str(defects),
                 "--out", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "warning: 8 of the 8 --calibration-defects images are also learnt" in err
    assert "warning: thresholds from 8 labelled defects: with 1-3 they lowered SegF1" in err
    assert err.count("labelled defects: with 1-3") == 1 and "UserWarning" not in err  # said once, before the fit


def test_the_python_api_warns_too_and_reads_the_folder_before_fitting(backbone_dir, data_root, tmp_path):
    """`AnomalyDetector.fit(calibration_defects=...)` gives the CLI's warnings as `CalibrationDefectsWarning`s, before
    any image is fitted: with a training image that does not exist, a bad calibration folder is still the error."""
    folder = _defects(tmp_path, data_root)
    learnt = DefectSet("test", tuple((image, None) for image in sorted((folder / "bad").glob("*.png"))[:3]))
    train = sorted((data_root / "demo" / "train" / "good").glob("*.png"))
    validation = sorted((data_root / "demo" / "validation" / "good").glob("*.png"))
    with pytest.warns(CalibrationDefectsWarning) as caught:
        AnomalyDetector(backbone=str(backbone_dir), image_size=112).fit(train, validation, progress=False,
                                                                       calibration_defects=folder, defects=learnt)
    texts = [str(w.message) for w in caught if w.category is CalibrationDefectsWarning]
    assert texts[0].startswith("thresholds from 8 labelled defects") and texts[1].startswith("3 of the 8")
    shutil.rmtree(folder / "bad")
    with pytest.raises(UserInputError, match="no bad/ folder"):
        AnomalyDetector(backbone=str(backbone_dir), image_size=112).fit([tmp_path / "missing.png"], validation,
                                                                       progress=False, calibration_defects=folder)


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
