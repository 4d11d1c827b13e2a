"""Tiling: tile positions, stitching into the global patch grid, and a high-resolution defect."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalyvfm import AnomalyDetector
from anomalyvfm.features.backbone import load_backbone
from anomalyvfm.data.transforms import to_tensor
from anomalyvfm.demo import textured_image
from anomalyvfm.features.extraction import extract_features
from anomalyvfm.features.tiles import Tiling


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("length, size, overlap", [(994, 448, 56), (4004, 448, 56), (448, 448, 56), (182, 224, 28), (700, 224, 0)])
def test_tiles_are_patch_aligned_and_cover_the_side(length, size, overlap):
    starts = Tiling(size, overlap).starts(length)
    assert starts[0] == 0 and all(s % 14 == 0 for s in starts)
    assert min(starts[-1] + size, length) == length and starts == sorted(set(starts))
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # no gap, at least `overlap` shared


def test_image_within_one_tile_gives_the_untiled_features(backbone_dir):
    backbone = load_backbone(str(backbone_dir))
    image = textured_image(np.random.default_rng(0), 112, 154)
    whole = next(extract_features(backbone, [image], 112))
    tiled = next(extract_features(backbone, [image], 112, tiling=Tiling(168, 56, 1.0)))
    assert tiled.processed_shape == whole.processed_shape == (112, 154)
    assert torch.equal(tiled.features, whole.features)


def test_stitched_grid_is_each_tiles_features_at_its_place(backbone_dir):
    """Columns seen by one tile hold that tile's features; shared columns the renormalised average."""
    backbone = load_backbone(str(backbone_dir), [2, 3])
    image = textured_image(np.random.default_rng(1), 56, 98)
    item = next(extract_features(backbone, [image], 56, batch_size=2, tiling=Tiling(56, 14, 1.0)))
    assert item.features.shape == (4, 7, backbone.feature_dim) and item.image_shape == (56, 98)
    x = to_tensor(image, (56, 98))
    with torch.inference_mode():
        tiles = {left: backbone(x[None, :, :, left : left + 56])[0] for left in Tiling(56, 14).starts(98)}
    assert sorted(tiles) == [0, 42]  # patch columns 0-3 and 3-6: column 3 is shared
    assert torch.allclose(item.features[:, :3], tiles[0][:, :3], atol=1e-6)
    assert torch.allclose(item.features[:, 4:], tiles[42][:, 1:], atol=1e-6)
    shared = F.normalize((tiles[0][:, 3] + tiles[42][:, 0]).unflatten(-1, (2, -1)), dim=-1).flatten(-2)
    assert torch.allclose(item.features[:, 3], shared, atol=1e-6)


def test_small_defect_on_a_4000px_image_is_found_only_with_tiling(backbone_dir):
    """A 20-px patch of fine (2-px) checker on a 4000x1000 surface: downscaling to the backbone's
    448-px short side averages it away; tiles at native resolution keep it. The image score is the mean
    of the top 0.02 % patches: a 2x2-patch defect among 20 000 patches vanishes in the default top 1 %."""
    rng = np.random.default_rng(0)
    height, width = 1000, 4000
    train, validation, good, bad = ([textured_image(rng, height, width) for _ in range(n)] for n in (2, 1, 1, 1))
    y, x = np.mgrid[0:height, 0:width]
    defect = (np.abs(y - 600) < 10) & (np.abs(x - 2500) < 10)
    checker = np.where((y // 2 + x // 2) % 2 == 0, 40, -40)[defect]
    bad[0][defect] = np.clip(bad[0][defect].astype(int) + checker[:, None], 0, 255).astype(np.uint8)
    contrast, scores = {}, {}
    for name, settings in {"untiled": {}, "tiled": {"tile_size": 448, "tile_overlap": 56, "tile_scale": 1.0}}.items():
        detector = AnomalyDetector(backbone=str(backbone_dir), image_size=448, layers=(2, 3), batch_size=16, scorer="mahalanobis",
                                   top_percent=0.02, **settings)
        good_pred, bad_pred = detector.fit(train, validation, progress=False).predict(good + bad, progress=False)
        assert bad_pred.anomaly_map.shape == (height, width)
        contrast[name] = bad_pred.anomaly_map[defect].max() / good_pred.anomaly_map.max()
        scores[name] = bad_pred.score / good_pred.score
        if name == "tiled":
            peak = np.unravel_index(bad_pred.anomaly_map.argmax(), (height, width))
            assert abs(peak[0] - 600) < 30 and abs(peak[1] - 2500) < 30  # the hottest pixel is the defect
    print(f"defect peak / good-image peak: {contrast}; image score defective / good: {scores}")
    assert contrast["tiled"] > 1.3 and contrast["untiled"] < 1.0
    assert scores["tiled"] > 1.3 and scores["untiled"] < 1.0
