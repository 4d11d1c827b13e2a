"""LoRA adaptation: target discovery, frozen base weights, loss weighting, save/load and the CLI."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from anomalyvfm import AnomalyDetector
from anomalyvfm.adaptation.lora import find_lora_targets, lora_parameters
from anomalyvfm.features.backbone import load_backbone
from anomalyvfm.cli.main import main
from anomalyvfm.data import load_dataset
from anomalyvfm.errors import UserInputError
from anomalyvfm.adaptation.losses import compactness_loss, confidence_weights, nearest_normal_distance, patch_loss, patch_targets
from anomalyvfm.adaptation.config import AdaptationConfig
from anomalyvfm.adaptation.training import make_batch, train_adapter

TINY = AdaptationConfig(steps=4, batch_size=4, crop_size=56, eval_every=2, val_images=2)


def _attention_tree(names: dict[str, str]) -> nn.Module:
    """A two-block module tree whose attention projections have transformers-version-specific names."""

    def block() -> nn.Module:
        attention = nn.Module()
        inner = nn.Module() if "inner" in names else attention
        for kind, leaf in names.items():
            if kind != "inner":
                setattr(inner, leaf, nn.Linear(4, 4))
        if inner is not attention:
            setattr(attention, names["inner"], inner)
        layer = nn.Module()
        layer.attention, layer.mlp = attention, nn.Sequential(nn.Linear(4, 4))
        return layer

    model = nn.Module()
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList([block(), block()])
    return model


@pytest.mark.parametrize("names, expected", [
    ({"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}, "encoder.layer.{}.attention.{}_proj"),  # transformers 5
    ({"inner": "attention", "q": "query", "k": "key", "v": "value"}, "encoder.layer.{}.attention.attention.{}"),  # 4.x
])
def test_lora_targets_are_found_under_both_naming_schemes(names, expected):
    query, value = ("q", "v") if "q_proj" in names.values() else ("query", "value")
    assert find_lora_targets(_attention_tree(names)) == [
        expected.format(0, query), expected.format(0, value), expected.format(1, query), expected.format(1, value)]
    assert len(find_lora_targets(_attention_tree(names), ("key",))) == 2
    with pytest.raises(UserInputError):
        find_lora_targets(nn.Sequential(nn.Linear(2, 2)))


def test_confidence_weights_trust_uncertain_patches_less_and_large_temperature_is_bce():
    targets = torch.tensor([[0.0, 0.5, 1.0, 0.25]])
    weights = confidence_weights(targets, temperature=0.5)[0]
    assert weights[1] < weights[3] < weights[0] == pytest.approx(weights[2].item())
    assert weights.mean() == pytest.approx(1.0)
    logits = torch.tensor([[-2.0, 0.3, 1.5, -0.7]])
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert patch_loss(logits, targets, "confidence", 1e6) == pytest.approx(bce.item(), rel=1e-5)
    assert patch_loss(logits, targets, "bce") == pytest.approx(bce.item())
    # A confident mistake costs more under confidence weighting than the same mistake on a border patch.
    wrong_border = patch_loss(torch.tensor([[-9.0, 5.0, 9.0, -9.0]]), targets, "confidence", 0.2)
    wrong_confident = patch_loss(torch.tensor([[9.0, 0.0, 9.0, -9.0]]), targets, "confidence", 0.2)
    assert wrong_confident > wrong_border
    with pytest.raises(ValueError):
        confidence_weights(targets, 0.0)


def test_patch_targets_are_covered_fractions():
    mask = torch.zeros(1, 28, 28)
    mask[0, :14, :7] = 1
    assert patch_targets(mask, 14)[0].tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_synthetic_half_of_a_batch_holds_its_defect(data_root):
    images = [s.path for s in load_dataset(data_root, "demo").split("train")]
    x, masks, labels = make_batch(images, [0, 1, 2, 3], np.random.default_rng(0), 112, 56, 14)
    assert x.shape == (4, 3, 56, 56) and masks.shape == (4, 56, 56)
    assert labels.tolist() == [0, 0, 1, 1]
    assert (masks[:2] == 0).all() and all((m > 0.5).any() for m in masks[2:])


def test_with_real_defects_part_of_the_anomalous_crops_are_cut_from_them_with_their_outline(data_root, tmp_path):
    """A plain red defect image with a square outline: the crops cut from it are all red, hold part of the square
    as their targets, are labelled anomalous; the normal half never is such a crop."""
    images = [s.path for s in load_dataset(data_root, "demo").split("train")]
    red = tmp_path / "red.png"
    Image.fromarray(np.tile(np.array([255, 0, 0], np.uint8), (112, 112, 1))).save(red)
    outline = np.zeros((112, 112), bool)
    outline[40:70, 50:80] = True
    x, masks, labels = make_batch(images, list(range(4)) * 4, np.random.default_rng(0), 112, 56, 14,
                                  defects=[(red, outline)])
    real = [bool((x[i] == x[i, :, :1, :1]).all()) for i in range(len(x))]  # one colour over the whole crop
    assert 0 < sum(real) < 8 and not any(real[:8])
    for i in np.flatnonzero(real):
        assert labels[i] == 1 and 0 < (masks[i] > 0.5).sum() <= 30 * 30  # part of the square (112 px: not resized)


def test_training_moves_features_and_leaves_base_weights_frozen(backbone_dir, data_root):
    ds = load_dataset(data_root, "demo")
    base = load_backbone(str(backbone_dir))
    adapted = load_backbone(str(backbone_dir))
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        reference = base(x)
    _, heads, record = train_adapter(adapted, [s.path for s in ds.split("train")], [s.path for s in ds.split("validation")],
                                     TINY, image_size=112)
    assert record["steps_run"] == 4 and record["best_step"] in (2, 4)
    assert not adapted.training and not heads.training
    after = adapted.state_dict()
    assert any("lora_" in k for k in after)
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)
    # peft moves a wrapped layer's own weights to `<layer>.base_layer.*`
    base_after = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == before.keys()
    assert all(torch.equal(base_after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert not torch.allclose(adapted(x), reference, atol=1e-6)
    assert sum(p.numel() for p in lora_parameters(adapted).values()) == record["trainable_parameters"]


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory, backbone_dir, data_root) -> tuple[Path, str]:
    """A LoRA model fitted through the CLI (few steps), and what fit printed."""
    out = tmp_path_factory.mktemp("lora") / "model"
    argv = ["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir), "--image-size", "112",
            "--out", str(out), "--lora", "--lora-steps", "4", "--lora-batch-size", "4", "--lora-image-size", "56",
            "--score", "fusion"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()


def test_cli_fit_lora_saves_adapter_heads_and_every_mode(lora_model):
    out, printed = lora_model
    assert "adapter + heads" in printed and "bytes" in printed
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "heads.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    calibration, lora = config["calibration"], config["settings"]["lora"]
    assert calibration["mode"] == "fusion" and set(calibration["modes"]) == {"distance", "head", "fusion"}
    assert lora["rank"] == 16 and lora["alpha"] == 32 and lora["steps"] == 4 and lora["crop_size"] == 56


def test_saved_lora_model_scores_like_the_fitted_one(lora_model, tmp_path, backbone_dir, data_root):
    ds = load_dataset(data_root, "demo")
    paths = [s.path for s in ds.split("test_public")][::3]
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, score="fusion", lora=TINY)
    detector.fit([s.path for s in ds.split("train")], [s.path for s in ds.split("validation")], progress=False)
    before = detector.predict(paths, progress=False)
    loaded = AnomalyDetector.load(detector.save(tmp_path / "m"))
    for a, b in zip(before, loaded.predict(paths, progress=False)):
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-5)
        assert a.is_anomalous == b.is_anomalous


def test_score_mode_override_switches_thresholds(lora_model, data_root, tmp_path):
    out, _ = lora_model
    head = AnomalyDetector.load(out, score="head")
    fusion = AnomalyDetector.load(out)
    assert fusion.score_mode == "fusion" and head.score_mode == "head"
    assert head.thresholds() == head.calibration.modes["head"] and fusion.thresholds() == fusion.calibration.modes["fusion"]
    assert head.thresholds().image_threshold != fusion.thresholds().image_threshold
    path = [s.path for s in load_dataset(data_root, "demo").split("test_public")][:1]
    assert head.predict(path, progress=False)[0].score != fusion.predict(path, progress=False)[0].score
    assert main(["evaluate", "--model", str(out), "--data", str(data_root), "--category", "demo", "--score", "distance",
                 "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_images"] == 16


def test_head_scores_need_a_lora_model(fitted_model, data_root, tmp_path, capsys):
    with pytest.raises(UserInputError, match="fit --lora"):
        AnomalyDetector.load(fitted_model, score="head")
    argv = ["fit", "--data", str(data_root), "--category", "demo", "--out", str(tmp_path / "m"), "--score", "head"]
    assert main(argv) == 2
    assert "--lora" in capsys.readouterr().err
    argv = ["fit", "--data", str(data_root), "--category", "demo", "--out", str(tmp_path / "m"), "--lora", "--temperature", "0"]
    assert main(argv) == 2
    assert "--temperature" in capsys.readouterr().err


def test_nearest_normal_distance_uses_only_other_normal_crops():
    features = torch.tensor([[[[0.0, 0.0]]], [[[3.0, 4.0]]], [[[0.0, 1.0]]]])  # (3 crops, 1x1 patch, 2 dims)
    distance = nearest_normal_distance(features, torch.tensor([True, True, False]))
    # crop 0's only other normal crop is crop 1 (distance 5), crop 2 is anomalous and not memory
    assert distance.flatten().tolist() == pytest.approx([5.0, 5.0, 1.0])


def test_compactness_loss_pulls_normal_patches_together_and_pushes_defects_out():
    torch.manual_seed(0)
    start = F.normalize(torch.randn(4, 3, 3, 8), dim=-1)
    targets = torch.zeros(4, 3, 3)
    targets[3, 1, 1] = 1.0  # one synthetic-defect patch in the last crop
    targets[3, 0, 1] = 0.3  # a border patch: neither pulled nor pushed
    normal_crops = torch.tensor([True, True, True, False])
    start[3, 1, 1] = start[0, 0, 0]  # the defect starts on top of a normal patch
    features = start.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([features], lr=0.05)
    before = nearest_normal_distance(start, normal_crops)
    for _ in range(60):
        loss, parts = compactness_loss(features, start, targets, normal_crops, margin=0.1, distill=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = nearest_normal_distance(features.detach(), normal_crops)
    normal = targets == 0
    assert after[normal].mean() < 0.8 * before[normal].mean()
    assert after[3, 1, 1] > after[normal].max() and before[3, 1, 1] < before[normal].max()
    assert set(parts) == {"pull", "push", "distill"} and parts["distill"] > 0
    assert torch.isfinite(features).all()


def test_compact_objective_selects_on_held_out_defects(backbone_dir, data_root):
    ds = load_dataset(data_root, "demo")
    adapted = load_backbone(str(backbone_dir))
    config = replace(TINY, objective="compact")
    _, _, record = train_adapter(adapted, [s.path for s in ds.split("train")], [s.path for s in ds.split("validation")],
                                 config, image_size=112)
    assert record["objective"] == "compact" and record["validation_history"][0][0] == 0
    assert record["best_validation_score"] == record["held_out_kept"] >= record["held_out_frozen"]
    assert 0 <= record["held_out_frozen"] <= 2 and record["best_step"] in (0, 2, 4)


def test_cli_fit_lora_compact_round_trip(backbone_dir, data_root, tmp_path):
    out = tmp_path / "model"
    argv = ["fit", "--data", str(data_root), "--category", "demo", "--backbone", str(backbone_dir), "--image-size", "112",
            "--out", str(out), "--lora", "--lora-objective", "compact", "--lora-steps", "4", "--lora-batch-size", "4",
            "--lora-image-size", "56", "--lora-margin", "0.2"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["lora"]["objective"] == "compact" and config["settings"]["lora"]["margin"] == 0.2
    assert config["record"]["lora"]["objective"] == "compact"
    ds = load_dataset(data_root, "demo")
    paths = [s.path for s in ds.split("test_public")][::4]
    detector = AnomalyDetector(backbone=str(backbone_dir), image_size=112, lora=replace(TINY, objective="compact"))
    detector.fit([s.path for s in ds.split("train")], [s.path for s in ds.split("validation")], progress=False)
    loaded = AnomalyDetector.load(detector.save(tmp_path / "api"))
    for a, b in zip(detector.predict(paths, progress=False), loaded.predict(paths, progress=False)):
        assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-5)
