"""Global (image-level) evidence in the image score: it sees what patches miss, is saved with the
model, loads old models as they were, and scores the same in an exported bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from anomalyvfm import AnomalyDetector
from anomalyvfm.checksums import sha256
from anomalyvfm.cli.main import main
from anomalyvfm.data import load_dataset, load_rgb
from anomalyvfm.scoring.image_evidence import fuse_image_evidence, global_distance, image_embedding


def _paths(data_root: Path, split: str) -> list[Path]:
    return [s.path for s in load_dataset(data_root, "demo").split(split)]


def _tinted(image: np.ndarray) -> np.ndarray:
    """The whole part in another colour: every patch is shifted alike, none stands out from its neighbours."""
    return np.clip(image.astype(np.int16) + np.array([60, -30, -30]), 0, 255).astype(np.uint8)


def test_global_distance_ranks_a_colour_shifted_image_above_good_ones(backbone_dir, data_root, one_thread):
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, image_evidence="patch+global")
    detector.fit(_paths(data_root, "train"), _paths(data_root, "validation"), progress=False)
    good = [load_rgb(p) for p in _paths(data_root, "test_public")[:8] if "good" in str(p)]
    images = good + [_tinted(image) for image in good]
    pipeline = detector.pipeline
    distance = [pipeline.score_views(items).global_distance for items in pipeline.view_features(images, None)]
    assert min(distance[len(good):]) > max(distance[:len(good)]), distance
    scores = [p.score for p in detector.predict(images, progress=False)]  # the fused image score keeps that order
    assert min(scores[len(good):]) > max(scores[:len(good)]), scores


def test_embedding_and_distance_arithmetic():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 5, 2 * 6)).astype(np.float32)
    embedding = image_embedding(features, blocks=2)
    assert embedding.shape == (12,) and np.linalg.norm(embedding) == pytest.approx(1, abs=1e-6)
    for block in embedding.reshape(2, 6):  # every block weighs the same
        assert np.linalg.norm(block) == pytest.approx(2 ** -0.5, abs=1e-6)
    bank = np.stack([embedding, -embedding, np.roll(embedding, 1)])
    assert global_distance(embedding, bank, k=1) == pytest.approx(0, abs=1e-6)
    assert global_distance(embedding, bank, k=99) == pytest.approx(np.mean(1 - bank @ embedding), abs=1e-6)
    stats = {"patch": [1.0, 2.0], "global": [0.1, 0.05]}
    assert fuse_image_evidence(3.0, {"global": 0.2}, stats, "patch") == 3.0
    assert fuse_image_evidence(3.0, {"global": 0.2}, stats, "patch+global") == pytest.approx(1.0 + 2.0)
    stats["defects"] = [0.5, 0.25]
    terms = {"global": 0.2, "defects": 0.0}
    assert fuse_image_evidence(3.0, terms, stats, "patch+defects") == pytest.approx(1.0 - 2.0)
    assert fuse_image_evidence(3.0, terms, stats, "patch+global+defects") == pytest.approx(1.0 + 2.0 - 2.0)
    with pytest.raises(ValueError, match="defects"):
        fuse_image_evidence(3.0, {"global": 0.2, "defects": None}, stats, "patch+defects")


def test_setting_round_trips_and_old_directories_score_patch(fitted_model, backbone_dir, data_root, tmp_path,
                                                            capsys, one_thread):
    model = tmp_path / "global"
    assert main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--image-evidence", "patch+global", "--out", str(model)]) == 0
    fitted = json.loads((model / "config.json").read_text())
    assert fitted["settings"]["image_evidence"] == "patch+global" and set(fitted["calibration"]["image_stats"]) == {
        "patch", "global"}
    loaded = AnomalyDetector.load(model)
    assert loaded.settings.image_evidence == "patch+global"
    paths = _paths(data_root, "test_public")
    once = [p.score for p in loaded.predict(paths, progress=False)]
    assert once == [p.score for p in AnomalyDetector.load(model).predict(paths, progress=False)]
    patch = [p.score for p in AnomalyDetector.load(fitted_model).predict(paths, progress=False)]
    assert once != patch

    # a directory written before image evidence: no setting, no statistics, no embeddings → "patch", same scores
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_bytes((fitted_model / "config.json").read_bytes())
    tensors = {k: v for k, v in load_file(str(fitted_model / "head.safetensors")).items() if not k.startswith("global.")}
    save_file(tensors, str(old / "head.safetensors"))
    config = json.loads((old / "config.json").read_text())
    del config["settings"]["image_evidence"], config["calibration"]["image_stats"]
    config["files"] = {"head.safetensors": sha256(old / "head.safetensors")}
    (old / "config.json").write_text(json.dumps(config))
    restored = AnomalyDetector.load(old)  # its backbone by the settings' reference
    assert restored.settings.image_evidence == "patch" and not restored.pipeline.head.has_global
    assert [p.score for p in restored.predict(paths, progress=False)] == patch

    # claiming patch+global without the embeddings is one line, exit 2
    config["settings"]["image_evidence"] = "patch+global"
    (old / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["predict", "--model", str(old), str(paths[0]), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "no global.embeddings" in err and len(err.strip().splitlines()) == 1, err


def test_image_evidence_auto_is_chosen_by_the_fit_recorded_and_shown(backbone_dir, data_root, tmp_path, one_thread):
    """`--image-evidence auto`: the fit chooses patch or patch+global on validation + synthetic anomalies, stores
    the choice as the setting (a model never holds "auto") and the figures in its record; /model shows them."""
    import requests
    from servers import live_server

    from anomalyvfm.detector import model_dir
    from anomalyvfm.service.app import create_app

    model = tmp_path / "auto"
    assert main(["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir),
                 "--image-size", "112", "--image-evidence", "auto", "--out", str(model)]) == 0
    stored = model_dir.read(model)
    choice = stored.record.auto_choice["image_evidence"]
    figures = choice["figures"]
    assert stored.settings.image_evidence == choice["chosen"] in ("patch", "patch+global")
    best = max(figures, key=lambda e: (figures[e]["val_image_auroc"], e == "patch"))
    assert choice["chosen"] == best  # the rule: the higher validation AUROC, a tie to patch
    assert (choice["chosen"] == "patch") != ("patch+global" == stored.settings.head_config().image_evidence)
    with live_server(create_app(model)) as base:
        card = requests.get(f"{base}/model", timeout=30).json()
    assert card["image_evidence_choice"]["chosen"] == choice["chosen"] and card["image_evidence"] == choice["chosen"]
