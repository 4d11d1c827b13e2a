import pytest
import torch

from anomalyvfm.features.backbone import load_backbone
from anomalyvfm.errors import UserInputError


def test_patch_features_shape_norm_and_truncation(backbone_dir):
    backbone = load_backbone(str(backbone_dir), [1, 3])
    assert len(backbone.model.encoder.layer) == 3  # block 4 dropped: never used
    x = torch.randn(2, 3, 56, 84)
    with torch.no_grad():
        features = backbone(x)
    assert features.shape == (2, 4, 6, 2 * backbone.hidden_size)
    norms = features.reshape(-1, 2, backbone.hidden_size).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_prefix_tokens_are_not_patch_features(backbone_dir):
    """Patch features are the normalised patch tokens in row-major order; the CLS token is not among them."""
    backbone = load_backbone(str(backbone_dir), [2])
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        tokens = backbone.block_tokens(x)[0]
        features = backbone(x)
    assert tokens.shape[1] == 1 + 9  # CLS + 3x3 patches
    expected = torch.nn.functional.normalize(tokens[0, 1:], dim=-1).reshape(3, 3, -1)
    assert torch.allclose(features[0], expected, atol=1e-6)
    cls = torch.nn.functional.normalize(tokens[0, :1], dim=-1)
    assert not any(torch.allclose(cls[0], f, atol=1e-3) for f in features[0].reshape(9, -1))


def test_register_tokens_are_skipped(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=56, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path), [2])
    assert backbone.num_prefix_tokens == 5
    x = torch.randn(1, 3, 56, 70)
    tokens = backbone.block_tokens(x)[0]
    with torch.no_grad():
        features = backbone(x)
    assert tokens.shape[1] == 5 + 20 and features.shape[1:3] == (4, 5)
    expected = torch.nn.functional.normalize(tokens[0, 5:], dim=-1).reshape(4, 5, -1)
    assert torch.allclose(features[0], expected, atol=1e-5)


def test_bad_layers_and_directories(backbone_dir, tmp_path):
    with pytest.raises(UserInputError, match="1..4"):
        load_backbone(str(backbone_dir), [5])
    with pytest.raises(UserInputError, match="no config.json"):
        load_backbone(str(tmp_path), [1])
