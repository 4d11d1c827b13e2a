import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomalyvfm import AnomalyDetector
from anomalyvfm.data import load_dataset, load_mask
from anomalyvfm.errors import NotFittedError, UserInputError


@pytest.mark.parametrize("scorer", ["mahalanobis", "knn"])
def test_defective_images_score_above_good_ones(backbone_dir, data_root, scorer):
    ds = load_dataset(data_root, "demo")
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, scorer=scorer)
    detector.fit([s.path for s in ds.split("train")], [s.path for s in ds.split("validation")], progress=False)
    test = ds.split("test_public")
    preds = detector.predict([s.path for s in test], progress=False)
    assert roc_auc_score([s.label for s in test], [p.score for p in preds]) >= 0.9
    hits = 0
    for sample, pred in zip(test, preds):
        assert pred.anomaly_map.shape == (112, 154) and pred.mask.shape == (112, 154)
        if sample.label:
            mask = load_mask(sample.mask_path)
            hits += pred.anomaly_map[mask].max() >= np.quantile(pred.anomaly_map, 0.95)
    assert hits >= 6  # the hottest region lies on the defect in most bad images


def test_thresholds_come_from_validation(backbone_dir, data_root):
    ds = load_dataset(data_root, "demo")
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112)
    val = [s.path for s in ds.split("validation")]
    detector.fit([s.path for s in ds.split("train")], val, progress=False)
    scores = [p.score for p in detector.predict_iter(val, progress=None, decide=False)]
    thresholds = detector.thresholds()
    assert thresholds.image_threshold == pytest.approx(np.mean(scores) + 3 * np.std(scores), rel=1e-6)
    assert thresholds.validation_stats["images"] == len(val)


def test_save_load_gives_identical_scores(fitted_model, data_root):
    ds = load_dataset(data_root, "demo")
    paths = [s.path for s in ds.split("test_public")][:6]
    detector = AnomalyDetector.load(fitted_model)
    first = detector.predict(paths, progress=False)
    again = AnomalyDetector.load(fitted_model).predict(paths, progress=False)
    for a, b in zip(first, again):
        assert a.score == b.score and np.array_equal(a.anomaly_map, b.anomaly_map)


def test_round_trip_in_memory_vs_loaded(tmp_path, backbone_dir, data_root):
    ds = load_dataset(data_root, "demo")
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, scorer="knn", coreset_ratio=0.2)
    detector.fit([s.path for s in ds.split("train")], [s.path for s in ds.split("validation")], progress=False)
    paths = [s.path for s in ds.split("test_public")][::3]
    before = detector.predict(paths, progress=False)
    after = AnomalyDetector.load(detector.save(tmp_path / "m")).predict(paths, progress=False)
    assert [p.score for p in before] == [p.score for p in after]
    assert AnomalyDetector.load(tmp_path / "m").settings.scorer == "knn"


def test_in_memory_arrays_and_bad_items(fitted_model, tmp_path):
    detector = AnomalyDetector.load(fitted_model)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    good = np.full((100, 130), 128, np.uint8)
    preds = detector.predict([good, broken, good], progress=False)
    assert [p.error is None for p in preds] == [True, False, True]
    assert "broken.png" in preds[1].error
    assert preds[0].score == preds[2].score and preds[0].anomaly_map.shape == (100, 130)


def test_an_unfitted_detector_says_so_in_one_user_error(backbone_dir, tmp_path):
    """Predict, thresholds and save before fit all raise `NotFittedError`, which the CLI prints as one
    line (it is a `UserInputError`), even when the runtime names a score mode."""
    detector = AnomalyDetector(backbone=str(backbone_dir), score="distance")
    calls = {"predict": lambda: detector.predict([np.zeros((32, 32, 3), np.uint8)], progress=False),
             "thresholds": detector.thresholds, "save": lambda: detector.save(tmp_path / "model")}
    for name, call in calls.items():
        with pytest.raises(NotFittedError, match="call fit") as caught:
            call()
        assert isinstance(caught.value, UserInputError), name
    assert not (tmp_path / "model").exists()


def test_fit_without_validation_holds_out_a_tenth(backbone_dir, data_root):
    ds = load_dataset(data_root, "demo")
    paths = [s.path for s in ds.split("train")] + [s.path for s in ds.split("validation")]
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=56).fit(paths, progress=False)
    assert detector.record.train_images == 15 and detector.thresholds().validation_stats["images"] == 2
