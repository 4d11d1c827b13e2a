"""`--auto`: choose image size, tiling, layers and scorer per category from train and validation only.

Real defects of a category are not available before deployment, and test labels must never steer a
setting (MVTec AD 2 protocol). So candidates are compared on the validation good images plus synthetic
anomalies made on them (`anomalyvfm.data.synthesis`): validation image AUROC (good vs synthetic) plus
AU-PRO(0.05) of the synthetic masks, the rule of `benchmarks/choose_layers.py`.

The grid is small because CPUs are slow: up to three views (the base short side, 1.5x it, and tiles of
the base size, overlapping by an eighth, over the image at twice the base resolution but never above
its native one) x two block pairs (the default and a shallower one) x two scorers. The
backbone runs once per view on a subsample of the training images and on the validation set; every
block pair and scorer of that view is fitted and scored from those same features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from anomalyvfm.evaluation import metrics as M
from anomalyvfm.features.backbone import Backbone, default_layers, load_backbone
from anomalyvfm.data import evenly_spaced, load_rgb
from anomalyvfm.data.images import ImageLike
from anomalyvfm.features.extraction import ImageFeatures, Tiling, extract_features
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.scoring.pooling import image_score
from anomalyvfm.scoring.scorers import SCORERS, make_scorer
from anomalyvfm.data.synthesis import synthetic_set

AUTO_TRAIN = 32  # training images fitted per candidate while choosing; the final fit uses all of them
AUTO_VALIDATION = 24  # validation good images; as many synthetic anomalies are made on them
SHALLOW_FRACTIONS = (1 / 3, 0.5)  # besides the default blocks, a shallower pair: finer, less semantic features


def block_dims(layers: Sequence[int], loaded: Sequence[int], hidden: int) -> torch.Tensor:
    """Feature columns of blocks `layers` in the features of a backbone that returns blocks `loaded`."""
    return torch.cat([torch.arange(loaded.index(b) * hidden, (loaded.index(b) + 1) * hidden) for b in layers])


def candidate_views(image_size: int, short_side: float) -> list[dict]:
    """The view settings tried: base size, 1.5x base, and tiles at twice the base resolution.

    Tiles are for detail that the base size throws away, so they never upscale beyond the native
    resolution; when that is no finer than the 1.5x view (small images), the tiled candidate is dropped.
    """
    larger = round(1.5 * image_size / 14) * 14
    views = [{"image_size": image_size, "tile_size": 0}, {"image_size": larger, "tile_size": 0}]
    scale = min(1.0, 2 * image_size / short_side)
    if scale * short_side > larger:
        views.append({"image_size": image_size, "tile_size": image_size, "tile_overlap": 14 * (image_size // 112),
                      "tile_scale": round(scale, 3)})
    return views


def _score_view(backbone, view: dict, layer_sets, train, images, masks, config, progress: bool) -> list[dict]:
    """Fit every (block pair, scorer) of one view on `train`; validation figures of each."""
    tiling = Tiling(view["tile_size"], view["tile_overlap"], view["tile_scale"]) if view["tile_size"] else None
    name = f"tiles {view['tile_size']} @ x{view['tile_scale']}" if tiling else f"{view['image_size']} px"
    dims = {layers: block_dims(layers, backbone.layers, backbone.hidden_size) for layers in layer_sets}
    keys = [(layers, scorer) for layers in layer_sets for scorer in SCORERS]
    scorers = {k: make_scorer(k[1], config.coreset_ratio, config.max_bank_candidates, config.seed) for k in keys}

    def bar(what: str) -> str | None:
        return f"auto: {what}, {name}" if progress else None

    for item in extract_features(backbone, train, view["image_size"], config.batch_size, bar("train"), tiling):
        flat = item.features.reshape(-1, item.features.shape[-1])
        for (layers, _), scorer in scorers.items():
            scorer.partial_fit(flat[:, dims[layers]])
    for scorer in scorers.values():
        scorer.finalize()
    grids: dict = {k: [] for k in keys}
    shapes = []
    for item in extract_features(backbone, images, view["image_size"], config.batch_size, bar("validation"), tiling):
        assert isinstance(item, ImageFeatures)  # validation images were decoded already
        h, w, dim = item.features.shape
        for (layers, scorer_name), scorer in scorers.items():
            grids[layers, scorer_name].append(scorer.score(item.features.reshape(h * w, dim)[:, dims[layers]]).reshape(h, w))
        shapes.append((item.processed_shape, item.image_shape))
    labels = np.array([m is not None for m in masks], int)
    truth = [m if m is not None else np.zeros(shape, bool) for m, (_, shape) in zip(masks, shapes)]
    rows = []
    for (layers, scorer_name), patch_grids in grids.items():
        maps = [anomaly_map(g, p, s, config.sigma).astype(np.float16) for g, (p, s) in zip(patch_grids, shapes)]
        scores = np.array([image_score(g, config.top_percent) for g in patch_grids])
        figures = {"val_image_auroc": M.image_auroc(labels, scores), "val_aupro_0.05": M.aupro(truth, maps, 0.05)}
        rows.append({"settings": {**view, "layers": list(layers), "scorer": scorer_name, "scales": []}, **figures})
    return rows


def choose_settings(config, train: Sequence[ImageLike], validation: Sequence[ImageLike], progress: bool = True) -> dict:
    """Compare the candidates on validation + synthetic anomalies; return the choice and every figure.

    `config` is the `DetectorConfig` being fitted: backbone, base image size and scorer parameters
    come from it. Only `train` and `validation` are read.
    """
    train = evenly_spaced(list(train), AUTO_TRAIN)
    good = [load_rgb(image) for image in evenly_spaced(list(validation), AUTO_VALIDATION)]
    synthetic = synthetic_set(good, per_stage=max(1, len(good) // 3), seed=config.seed)
    images = good + [image for image, _, _ in synthetic]
    masks = [None] * len(good) + [mask for _, mask, _ in synthetic]
    loaded = load_backbone(config.backbone, None, config.device, config.precision)  # default blocks: the deepest needed
    depth = loaded.model.config.num_hidden_layers
    layer_sets = [default_layers(depth), tuple(sorted({max(1, round(depth * f)) for f in SHALLOW_FRACTIONS}))]
    backbone = Backbone(loaded.model, sorted({b for s in layer_sets for b in s}), config.precision)
    short_side = float(np.median([min(image.shape[:2]) for image in good]))
    rows = []
    for view in tqdm(candidate_views(config.image_size, short_side), desc="auto: candidates", disable=not progress):
        rows += _score_view(backbone, view, layer_sets, train, images, masks, config, progress)
    best = max(rows, key=lambda r: r["val_image_auroc"] + r["val_aupro_0.05"])
    return {"chosen": best["settings"], "rule": "max validation image AUROC + AU-PRO(0.05), synthetic anomalies",
            "train_images": len(train), "validation_images": len(good), "synthetic_images": len(synthetic),
            "candidates": rows}
