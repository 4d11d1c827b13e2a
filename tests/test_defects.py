"""`fit --defects DIR` / `--defects-from-store URL`: labelled real defects learnt as a defect memory bank.

The arithmetic (`head.defects`) against brute force; the fit end to end on the demo data (half its defects
learnt, the other half and the good images scored); weak labels; the store as the source; an exported form
scoring alike; bad input as one line.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyvfm.cli.main import main
from anomalyvfm.data import load_mask
from anomalyvfm.data.resample import block_means
from anomalyvfm.deploy.load import load_predictor
from anomalyvfm.detector import model_dir
from anomalyvfm.detector.defect_cut import DEFAULT_CUT, GROWN_CUT, cut_from_counts
from anomalyvfm.detector.defects import learn_defects
from anomalyvfm.head.calibration import Calibration
from anomalyvfm.head.defects import (DefectEvidence, ScoredImage, bank_key, defect_bank, defect_distance, defect_rows,
                                     image_bank_key, prepared_bank, raise_scores)
from anomalyvfm.head.head import HeadConfig, ScoringHead
from anomalyvfm.head.scores import ViewScores
from anomalyvfm.scoring.distances import unit_rows
from anomalyvfm.store import open_store


def image(grids, features, mask=None) -> ScoredImage:
    return ScoredImage(ViewScores("d", grids, None, (28, 42), (20, 30)), features, mask)


def test_a_patch_is_raised_only_by_how_much_nearer_a_known_defect_it_is_than_normal():
    rng = np.random.default_rng(0)
    bank = unit_rows(rng.normal(size=(50, 8)))
    defect = unit_rows(rng.normal(size=(3, 8)))
    head = ScoringHead(HeadConfig("knn", 1, 1), {"view0.bank": bank, "defects.view0.bank": defect})
    x = np.r_[bank[:5] + 0.01 * rng.normal(size=(5, 8)), defect + 0.05 * rng.normal(size=(3, 8)), rng.normal(size=(20, 8))]
    normal = 1 - (unit_rows(x) @ bank.T).max(1)
    nearest_defect = 1 - (unit_rows(x) @ defect.T).max(1)
    scores = head.score_views([x.reshape(1, -1, 8)], "x", (14, 392), (14, 392)).grids[0].reshape(-1)
    np.testing.assert_allclose(scores, normal + np.maximum(normal - nearest_defect, 0), rtol=1e-5, atol=1e-6)
    assert (scores >= normal - 1e-6).all()
    np.testing.assert_allclose(scores[:5], normal[:5], atol=1e-6)  # nearer normal than any defect: unchanged
    assert (scores[5:8] > normal[5:8] + 0.1).all()  # the patches like a known defect: nearly doubled


def test_mahalanobis_defect_distance_is_the_mahalanobis_distance_between_the_patches():
    rng = np.random.default_rng(1)
    mean, whitener = rng.normal(size=6).astype(np.float32), np.linalg.cholesky(np.eye(6) * 2).astype(np.float32)
    patches, x = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(7, 6)).astype(np.float32)
    arrays = {"view0.mean": mean, "view0.whitener": whitener}
    defects = [image([np.full((2, 2), 10.0)], [patches.reshape(2, 2, 6)])]
    banks, kept = defect_bank(arrays, "mahalanobis", defects, [0.0], top_percent=100)
    precision = whitener @ whitener.T
    brute = np.array([[np.sqrt((a - b) @ precision @ (a - b)) for b in patches] for a in x]).min(1)
    prepared = prepared_bank(banks["defects.view0.bank"], (mean, whitener))
    np.testing.assert_allclose(defect_distance(x, prepared, (mean, whitener)), brute, rtol=1e-4)
    assert kept == [[4]]
    np.testing.assert_array_equal(raise_scores(np.array([1.0, 3.0], np.float32), np.array([0.0, 0.5], np.float32), 2.0),
                                  [1.0, 6.0])


def test_kept_patches_touch_the_outline_and_score_above_the_floor():
    distances = np.array([[0.1, 0.9, 0.2], [0.8, 0.05, 0.3]], np.float32)
    mask = np.zeros((20, 30), bool)
    mask[:10, 10:30] = True  # the outline covers the top row's last two patches
    defect = image([distances], [np.zeros((2, 3, 4))], mask)
    assert defect_rows(defect, 0, floor=0.5, top_percent=1).tolist() == [1]  # (0, 2) touches but scores like normal
    weak = image([distances], [np.zeros((2, 3, 4))])
    assert defect_rows(weak, 0, floor=0.5, top_percent=34).tolist() == [1, 3]  # the top third of patches
    assert defect_rows(weak, 0, floor=0.85, top_percent=34).tolist() == [1]


def synthetic_images(head: ScoringHead, features: list[np.ndarray], masks=None) -> list[ScoredImage]:
    masks = masks or [None] * len(features)
    return [ScoredImage(head.score_views([f], f"i{i}", (56, 56), (56, 56)), [f], m)
            for i, (f, m) in enumerate(zip(features, masks))]


@pytest.mark.parametrize("alike, chosen", [(True, "raised"), (False, 0.0)])
def test_the_weight_is_chosen_on_held_out_labelled_defects(alike, chosen):
    """Defects of one kind (alike): a held-out one is found better with the others' patches, so a weight > 0 wins.
    Defects that share nothing: no held-out one gains, and the tie keeps the model without defects (0)."""
    rng = np.random.default_rng(0)
    dim, normal_direction = 16, np.eye(16)[0]
    def normal(n):
        return normal_direction + 0.05 * rng.normal(size=(n, dim))
    head = ScoringHead(HeadConfig("knn", 1, 1), {"view0.bank": unit_rows(normal(400))})
    validation = [normal(16).reshape(4, 4, dim) for _ in range(12)]
    for image in validation[:4]:  # a few good parts with one odd patch: a faint defect ranks among them
        image[0, 0] = normal_direction + 0.25 * rng.normal(size=dim)
    defects, masks = [], []
    kind = rng.normal(size=dim)
    for _ in range(4):
        image = normal(16).reshape(4, 4, dim)
        direction = kind if alike else rng.normal(size=dim)
        image[1:3, 1:3] = normal_direction + direction / np.linalg.norm(direction) + 0.02 * rng.normal(size=(2, 2, dim))
        mask = np.zeros((56, 56), bool)
        mask[14:42, 14:42] = True
        defects.append(image), masks.append(mask)
    normal_images = synthetic_images(head, validation)
    calibration = calibrate_scored_head(head, normal_images)
    labelled = synthetic_images(head, defects, masks)
    arrays, record = learn_defects(head, calibration, labelled, normal_images, "test")
    single_arrays, single = learn_defects(head, calibration, labelled[:1], normal_images, "test")
    assert single["weight"] == 0.0 and single["choice"]["folds"] == 0  # one defect: nothing to check it on, none learnt
    assert not single["image_evidence"]["learnt"] and not any(key.startswith("defects.") for key in single_arrays)
    # the image score's defect term needs ten defects, and is then kept whatever the patch evidence chosen
    assert not record["image_evidence"]["learnt"] and "defects.image.view0.bank" not in arrays
    many_arrays, many = learn_defects(head, calibration, labelled * 3, normal_images, "test")
    assert many["image_evidence"]["learnt"] and many["image_evidence"]["images"] == 12
    assert "defects.image.view0.bank" in many_arrays
    figures = record["choice"]["figures"]
    assert record["choice"]["folds"] == 4 and set(figures) == {"none", *(f"{k} {w}" for k in ("bank", "linear") for w in (1, 2, 4))}
    if chosen == "raised":
        learnt = "defects.view0.bank" if record["kind"] == "bank" else "defects.view0.direction"
        assert record["weight"] > 0 and learnt in arrays
        assert figures[f"{record['kind']} {record['weight']:g}"] > figures["none"]
    else:
        assert record["weight"] == 0.0 and not any(key.startswith("defects.view") for key in arrays)


def test_the_pooled_choice_counts_false_alarms_around_defects_and_wants_a_gain_beyond_noise():
    """`pooled_figures`: a candidate that outlines the defects whole *and* their surroundings loses AU-PRO through
    the defective images' own normal pixels (the old per-fold figure, against good images only, missed that); a
    candidate equal to none is never beyond the interval; a clear ranking gain is."""
    from types import SimpleNamespace

    from anomalyvfm.detector.defects import pooled_figures

    rng = np.random.default_rng(0)
    side, n_normal, n_defect = 32, 12, 10
    truth = np.zeros((side, side), bool)
    truth[12:20, 12:20] = True
    halo = np.zeros((side, side), bool)
    halo[4:28, 4:28] = True

    def noise():
        return rng.random((side, side)).astype(np.float16)

    normal = [[(float(s), m), (float(s), m), (float(s), m), (float(s), m)]
              for s, m in ((rng.random(), noise()) for _ in range(n_normal))]
    held = []
    for _ in range(n_defect):
        base, score = noise(), float(rng.random() * 0.9 + 0.3)  # ranks among the good parts: AUROC well below 1
        faint = np.where(truth, base + np.float16(0.6), base).astype(np.float16)
        haloed = np.where(halo & ~truth, base + np.float16(3.0), faint).astype(np.float16)  # raised around it
        held.append((SimpleNamespace(mask=truth), [(score, faint), (score, faint), (score + 10, faint), (score, haloed)]))
    candidates = [("bank", 0.0), ("bank", 1.0), ("bank", 2.0), ("linear", 1.0)]
    figures, differences = pooled_figures(candidates, normal, held)
    assert figures[1] == figures[0] and differences[1] == [0.0, 0.0]  # equal: not beyond the interval
    assert figures[2] > figures[0] and differences[2][0] > 0  # every defect ranked above every good part
    assert figures[3] < figures[0] and differences[3][1] < 0  # the halo's false alarms sink it


def test_the_cut_changes_only_when_grown_outlines_are_better_beyond_noise():
    labels = np.r_[np.zeros(10, int), np.ones(5, int)]
    normal = np.tile([0.0, 30.0, 0.0], (10, 1))  # a few false-alarm pixels on good images, the same under both cuts
    core = np.tile([20.0, 2.0, 80.0], (5, 1))  # MEBin: a defect's core
    dome = np.tile([85.0, 10.0, 15.0], (5, 1))  # grown: most of it
    chosen = cut_from_counts({DEFAULT_CUT: np.r_[normal, core], GROWN_CUT: np.r_[normal, dome]}, labels)
    assert chosen["chosen"] == GROWN_CUT and chosen["grown_minus_mebin_95"][0] > 0
    assert chosen["seg_f1"][GROWN_CUT] > chosen["seg_f1"][DEFAULT_CUT] and chosen["why"].startswith(GROWN_CUT)
    one = np.r_[dome[:1], core[1:] * [0.5, 1.0, 1.0] + [0.0, 0.0, 10.0]]  # better on one defect, worse on four
    assert cut_from_counts({DEFAULT_CUT: np.r_[normal, core], GROWN_CUT: np.r_[normal, one]}, labels)["chosen"] == DEFAULT_CUT
    same = cut_from_counts({DEFAULT_CUT: np.r_[normal, core], GROWN_CUT: np.r_[normal, core]}, labels)
    assert same["chosen"] == DEFAULT_CUT and same["grown_minus_mebin_95"] == [0.0, 0.0]


def calibrate_scored_head(head: ScoringHead, images: list[ScoredImage]) -> Calibration:
    from anomalyvfm.head.scores import view_statistics

    return Calibration("distance", {}, view_stats=view_statistics([image.scored for image in images]))


def defect_folder(data_root: Path, folder: Path, names: list[str], outlines: bool = True, copies: int = 1) -> Path:
    """A labelled-defect folder of the demo defects `names`, each `copies` times (the demo has 8 defects; the image
    score learns from ten)."""
    source = data_root / "demo" / "test_public"
    (folder / "bad").mkdir(parents=True)
    (folder / "ground_truth" / "bad").mkdir(parents=True)
    for name in names:
        for copy in range(copies):
            stem = Path(name).stem + (f"_{copy}" if copy else "")
            shutil.copy(source / "bad" / name, folder / "bad" / f"{stem}.png")
            if outlines:
                shutil.copy(source / "ground_truth" / "bad" / f"{Path(name).stem}_mask.png",
                            folder / "ground_truth" / "bad" / f"{stem}_mask.png")
    return folder


def fit(backbone_dir: Path, data_root: Path, out: Path, *options: str) -> int:
    return main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", *options, "--out", str(out)])


def scores(model: Path, paths: list[Path], **runtime) -> np.ndarray:
    return np.array([p.score for p in load_predictor(model, **runtime).predict(paths, progress=False)])


@pytest.fixture(scope="module")
def halves(data_root) -> tuple[list[Path], list[Path]]:
    bad = sorted((data_root / "demo" / "test_public" / "bad").glob("*.png"))
    return bad[:4], bad[4:]


@pytest.fixture(scope="module")
def with_defects(backbone_dir, data_root, halves, tmp_path_factory) -> Path:
    """A model that learnt the first half of the demo defects (outlined), each three times (twelve defects)."""
    folder = tmp_path_factory.mktemp("defects")
    out = folder / "model"
    assert fit(backbone_dir, data_root, out, "--defect-weight", "1", "--defects",
               str(defect_folder(data_root, folder / "labelled", [p.name for p in halves[0]], copies=3))) == 0
    return out


def predictions(model: Path, paths: list[Path]) -> list:
    return load_predictor(model).predict(paths, progress=False)


def test_learnt_defects_raise_similar_defects_and_leave_good_parts_alone(fitted_model, with_defects, data_root, halves):
    learnt, held_out = halves
    stored = model_dir.read(with_defects)
    record = stored.record.defects
    assert record["images"] == record["outlined"] == 12 and record["patches_per_view"][0] > 0
    assert record["weight"] == stored.settings.defect_weight == 1.0 and record["choice"]["rule"].startswith("given")
    assert len(stored.head["defects.view0.bank"]) == record["patches_per_view"][0]
    good = sorted((data_root / "demo" / "test_public" / "good").glob("*.png"))
    for mine, plain in zip(predictions(with_defects, good), predictions(fitted_model, good)):  # maps: good parts alone
        np.testing.assert_allclose(mine.anomaly_map, plain.anomaly_map, rtol=1e-5, atol=1e-6)
    before = [p.anomaly_map for p in predictions(fitted_model, held_out)]
    after = [p.anomaly_map for p in predictions(with_defects, held_out)]
    assert all((a >= b - 1e-5).all() for a, b in zip(after, before))  # never lower
    assert any(a.max() > b.max() * 1.05 for a, b in zip(after, before))  # a similar one raised
    # the image score adds the defect term, standardised on validation: every defect scores above every good part
    assert record["image_evidence"]["learnt"] and len(stored.head["defects.image.view0.bank"]) == len(stored.head["defects.view0.bank"])
    assert {"patch", "defects"} <= set(stored.calibration.image_stats)
    assert min(scores(with_defects, [*learnt, *held_out])) > max(scores(with_defects, good))
    # the mask cut the outlined defects chose is the model's, by its rule: grown only beyond the interval
    cut = record["cut"]
    assert cut["chosen"] == stored.settings.binarize and cut["defects"] == 12
    assert (cut["chosen"] == GROWN_CUT) == (cut["grown_minus_mebin_95"][0] > 0)
    assert all(0 <= f <= 1 for f in cut["seg_f1"].values())
    # no threshold was set from the defects: the pixel threshold is the normal-only model's
    assert stored.calibration.thresholds().pixel_threshold == pytest.approx(
        model_dir.read(fitted_model).calibration.thresholds().pixel_threshold, rel=1e-6)


def test_fewer_than_ten_defects_leave_the_image_score_alone(fitted_model, backbone_dir, data_root, halves, tmp_path,
                                                            capsys):
    folder, out = defect_folder(data_root, tmp_path / "labelled", [p.name for p in halves[0]]), tmp_path / "model"
    capsys.readouterr()
    assert fit(backbone_dir, data_root, out, "--defect-weight", "1", "--binarize", "hysteresis", "--defects", str(folder)) == 0
    said = capsys.readouterr().out
    assert "the image score is unchanged (4 labelled defects kept patches, fewer than 10)" in said
    assert "mask cut hysteresis: set by the user" in said and model_dir.read(out).settings.binarize == "hysteresis"
    stored = model_dir.read(out)
    assert not stored.record.defects["image_evidence"]["learnt"] and "defects.view0.bank" in stored.head
    assert not any(key.startswith("defects.image.") for key in stored.head) and "defects" not in stored.calibration.image_stats
    good = sorted((data_root / "demo" / "test_public" / "good").glob("*.png"))
    np.testing.assert_allclose(scores(out, good), scores(fitted_model, good), rtol=1e-6)
    assert (scores(out, halves[0]) > scores(fitted_model, halves[0])).all()  # the learnt defects raised, patches only


def test_mirrored_copies_are_learnt_with_their_defect(fitted_model, backbone_dir, data_root, halves, tmp_path, capsys):
    from anomalyvfm.detector.defects import FLIPS, defects_from_folder, scored_images, with_flipped_copies
    from anomalyvfm.detector.detector import AnomalyDetector
    folder = defect_folder(data_root, tmp_path / "labelled", [p.name for p in halves[0]])
    # each copy is its defect mirrored, outline and all: the normal model scores it high inside the mirrored outline
    detector, defects = AnomalyDetector.load(fitted_model), defects_from_folder(folder)
    views = list(detector.view_features([image for image, _ in defects.pairs]))
    found = with_flipped_copies(detector.pipeline, scored_images(detector.pipeline.head, views,
                                                                 [m for _, m in defects.pairs]), defects, False)
    for defect in found:
        assert len(defect.copies) == len(FLIPS) == 3 and not defect.copies[0].copies
        for copy, flip in zip(defect.copies, FLIPS):
            np.testing.assert_array_equal(copy.mask, defect.mask[flip])
            grid = copy.scored.grids[0]
            inside = block_means(copy.mask.astype(np.float32), grid.shape) > 0
            assert grid[inside].mean() > grid[~inside].mean()
    plain, mirrored = tmp_path / "plain", tmp_path / "mirrored"
    assert fit(backbone_dir, data_root, plain, "--defect-weight", "1", "--defects", str(folder)) == 0
    capsys.readouterr()
    assert fit(backbone_dir, data_root, mirrored, "--defect-weight", "1", "--defect-flips", "--defects", str(folder)) == 0
    assert "4 labelled images (4 outlined, each also learnt mirrored 3 ways)" in capsys.readouterr().out
    without, with_copies = model_dir.read(plain), model_dir.read(mirrored)
    assert without.record.defects["copies"] == 0 and with_copies.record.defects["copies"] == 12
    assert with_copies.settings.defect_flips and not without.settings.defect_flips
    # the originals' kept patches and the copies': the plain bank's rows are all in the mirrored one, and more beside
    plain_rows, mirrored_rows = without.head["defects.view0.bank"], with_copies.head["defects.view0.bank"]
    assert len(mirrored_rows) > len(plain_rows) and all((mirrored_rows == row).all(1).any() for row in plain_rows)


def test_an_exported_form_carries_the_defect_bank(with_defects, halves, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "linepc"
    assert main(["export", "--model", str(with_defects), "--out", str(out), "--format", "onnx", "--precision", "fp32"]) == 0
    images = [*halves[0], *halves[1]]
    np.testing.assert_allclose(scores(out, images, backend="onnx"), scores(with_defects, images), rtol=1e-4)


def test_an_update_keeps_the_defect_bank_of_a_mahalanobis_model(backbone_dir, data_root, halves, tmp_path):
    """The Mahalanobis defect rows are features, whitened by the head in use: an update that grows the Gaussian
    keeps them, and the learnt defects stay raised under it."""
    folder = defect_folder(data_root, tmp_path / "labelled", [p.name for p in halves[0]])
    model, updated = tmp_path / "model", tmp_path / "updated"
    assert fit(backbone_dir, data_root, model, "--scorer", "mahalanobis", "--defect-weight", "1", "--defects", str(folder)) == 0
    assert main(["update", "--model", str(model), "--good", str(data_root / "demo" / "validation" / "good"),
                 "--out", str(updated)]) == 0
    parent, child = model_dir.read(model), model_dir.read(updated)
    np.testing.assert_array_equal(parent.head["defects.view0.bank"], child.head["defects.view0.bank"])
    assert not np.array_equal(parent.head["view0.mean"], child.head["view0.mean"])
    without = ScoringHead(replace(child.settings.head_config(), defect_weight=0.0), child.head)
    predictor = load_predictor(updated)
    for view in predictor.view_features(halves[0]):
        plain = without.score_views(view.views, view.source, view.processed_shape, view.image_shape).grids[0]
        raised = predictor.pipeline.head.score_views(view.views, view.source, view.processed_shape, view.image_shape).grids[0]
        assert (raised >= plain - 1e-5).all() and (raised > plain + 1e-3).any()


def test_defects_without_outlines_are_weak_labels(backbone_dir, data_root, halves, tmp_path, capsys):
    folder = defect_folder(data_root, tmp_path / "weak", [p.name for p in halves[0]], outlines=False)
    assert fit(backbone_dir, data_root, tmp_path / "model", "--defects", str(folder)) == 0
    said = capsys.readouterr().out
    assert "defects: 4 labelled images (0 outlined)" in said and "mask cut mebin: 0 outlined defects, fewer than 3" in said
    record = model_dir.read(tmp_path / "model").record.defects
    assert record["images"] == 4 and record["outlined"] == 0 and record["patches_per_view"][0] > 0


def test_defects_from_the_inspection_store(fitted_model, backbone_dir, data_root, halves, tmp_path, capsys):
    """Inspections an operator labelled defect (their kept images) are learnt like a folder without outlines."""
    db = tmp_path / "results.db"
    assert main(["predict", "--model", str(fitted_model), *map(str, halves[0]), "--out", str(tmp_path / "p"),
                 "--store", str(db)]) == 0
    store = open_store(str(db))
    for record in store.find(limit=100)[0]:
        store.set_label(record["id"], "defect")
    store.close()
    out = tmp_path / "model"
    assert fit(backbone_dir, data_root, out, "--defects-from-store", str(db)) == 0
    record = model_dir.read(out).record.defects
    assert record["source"] == str(db) and record["images"] == 4 and record["outlined"] == 0
    empty = tmp_path / "empty.db"
    open_store(str(empty)).close()
    capsys.readouterr()
    assert fit(backbone_dir, data_root, tmp_path / "none", "--defects-from-store", str(empty)) == 2
    assert "no inspection is labelled defect" in capsys.readouterr().err


LORA = ["--lora", "--lora-steps", "4", "--lora-batch-size", "4", "--lora-image-size", "56"]


def test_with_lora_the_outlined_defects_train_the_adapter_and_heads(backbone_dir, data_root, halves, tmp_path, capsys):
    """`fit --lora --defects`: LoRA + heads learn the outlined defects in training (no bank, no weight); a folder
    with no outline, or a defect weight beside --lora, is one line."""
    folder = defect_folder(data_root, tmp_path / "labelled", [p.name for p in halves[0]])
    out = tmp_path / "model"
    assert fit(backbone_dir, data_root, out, *LORA, "--score", "fusion", "--defects", str(folder)) == 0
    assert "LoRA + heads trained on crops of the 4 outlined defects" in capsys.readouterr().out
    stored = model_dir.read(out)
    assert stored.record.defects["kind"] == "lora" and stored.record.lora["real_defects"] == 4
    assert not any(key.startswith("defects.") for key in stored.head) and stored.settings.defect_weight is None
    weak = defect_folder(data_root, tmp_path / "weak", [p.name for p in halves[0]], outlines=False)
    for options, named in (([*LORA, "--defects", str(weak)], "none of its 4 defects has one"),
                           ([*LORA, "--defect-weight", "1", "--defects", str(folder)], "--defect-weight sets the weight")):
        assert fit(backbone_dir, data_root, tmp_path / "refused", *options) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("damage, named", [
    ("no bad folder", "no bad/ folder"),
    ("empty", "no images found"),
    ("small mask", "001_regular_mask.png: mask is"),
    ("empty mask", "001_regular_mask.png: the mask outlines nothing"),
    ("unreadable image", "001_regular.png"),
    ("budget rule", "--threshold-rule budget is not supported"),
    ("no normal images", "train/good: no images found"),
])
def test_bad_defects_are_one_line_naming_the_file(damage, named, backbone_dir, data_root, tmp_path, capsys):
    folder = defect_folder(data_root, tmp_path / "defects", ["001_regular.png", "002_regular.png"])
    mask = folder / "ground_truth" / "bad" / "001_regular_mask.png"
    options = []
    if damage == "no bad folder":
        shutil.rmtree(folder / "bad")
    elif damage == "empty":
        for image in (folder / "bad").iterdir():
            image.unlink()
    elif damage == "small mask":
        Image.fromarray(np.full((10, 10), 255, np.uint8)).save(mask)
    elif damage == "empty mask":
        Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape[:2], np.uint8)).save(mask)
    elif damage == "unreadable image":
        (folder / "bad" / "001_regular.png").write_bytes(b"not an image")
    elif damage == "budget rule":
        options = ["--threshold-rule", "budget"]
    else:  # defect images, but no good ones to learn normal from
        data_root = tmp_path / "data"
        shutil.copytree(folder.parent / "defects", data_root / "demo" / "test_public")
        (data_root / "demo" / "train" / "good").mkdir(parents=True)
    out = tmp_path / "model"
    capsys.readouterr()
    assert fit(backbone_dir, data_root, out, "--defects", str(folder), *options) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and not out.exists()


@pytest.mark.parametrize("scorer, kind", [("knn", "bank"), ("mahalanobis", "bank"), ("knn", "linear")])
def test_evidence_on_scored_views_is_what_a_head_with_the_bank_computes(scorer, kind, backbone_dir, data_root, halves):
    """`DefectEvidence` (the weight choice, the study) gives the very scores of a head holding what was learnt."""
    from anomalyvfm.detector.defects import Learner, image_bank

    from anomalyvfm.detector.defects import scored_images
    from anomalyvfm.detector.detector import AnomalyDetector
    root = data_root / "demo"
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, scorer=scorer).fit(
        sorted((root / "train" / "good").glob("*.png")), sorted((root / "validation" / "good").glob("*.png")), progress=False)
    head = detector.pipeline.head
    views = list(detector.view_features([*halves[0], *halves[1]]))
    masks = [load_mask(root / "test_public" / "ground_truth" / "bad" / f"{Path(v.source).stem}_mask.png") for v in views]
    images = scored_images(head, views, masks)
    learner = Learner(head, detector.calibration)
    learnt, kept = learner.learn(kind, images[:4])
    image_arrays, record = image_bank(learner, images[:4] * 3, None)
    assert sum(rows[0] for rows in kept) > 0 and learnt and record["learnt"] and image_arrays
    arrays = {**head.state_dict(), **learnt, **image_arrays}
    with_bank = ScoringHead(replace(head.config, defect_weight=2.0), arrays)
    evidence = DefectEvidence(arrays, [head.gaussian(0)])
    changed = 0
    for image, v in zip(images, views):
        rescored = evidence.rescored(image, 2.0, head.config.top_percent)
        direct = with_bank.score_views(v.views, v.source, v.processed_shape, v.image_shape)
        np.testing.assert_array_equal(rescored.grids[0], direct.grids[0])
        assert rescored.defect_evidence == direct.defect_evidence is not None
        changed += rescored.grids[0] is not image.scored.grids[0]
    assert changed >= 4  # at least the learnt defects themselves were raised
    if kind == "bank":  # image bank = patch bank (as `fit --defects` learns them): one defect search serves both
        same = {**arrays, image_bank_key(0): learnt[bank_key(0)]}
        shared = DefectEvidence(same, [head.gaussian(0)])
        assert shared.shared == {0}
        for image in images:
            assert shared.rescored(image, 2.0, head.config.top_percent).defect_evidence == pytest.approx(
                shared.image_evidence(image, head.config.top_percent), rel=1e-6)
