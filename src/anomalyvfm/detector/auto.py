"""`--auto`: choose image size, tiling, layers and scorer per category from train and validation only.

Real defects of a category are not available before deployment, and test labels must never steer a
setting (MVTec AD 2 protocol). So candidates are compared on the validation good images plus synthetic
anomalies made on them (`anomalyvfm.data.synthesis`): validation image AUROC (good vs synthetic) plus
AU-PRO(0.05) of the synthetic masks (`detector.candidates`), the rule of `benchmarks/choose_settings.py`.

The grid is small because CPUs are slow: up to three views (the base short side, 1.5x it, and tiles of
the base size, overlapping by an eighth, over the image at twice the base resolution but never above
its native one) x two block pairs (the default and a shallower one) x two scorers. The
backbone runs once per view on a subsample of the training images and on the validation set; every
block pair and scorer of that view is fitted and scored from those same features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from anomalyvfm.data import evenly_spaced, load_rgb
from anomalyvfm.data.images import ImageLike
from anomalyvfm.detector.candidates import block_dims, fit_candidates, score_candidates, with_synthetic_anomalies
from anomalyvfm.detector.settings import Runtime, Settings
from anomalyvfm.features.backbone import Backbone, default_layers, load_backbone
from anomalyvfm.features.tiles import Tiling
from anomalyvfm.scoring.names import SCORERS
from anomalyvfm.scoring.scorers import make_scorer

AUTO_TRAIN = 32  # training images fitted per candidate while choosing; the final fit uses all of them
AUTO_VALIDATION = 24  # validation good images; as many synthetic anomalies are made on them
SHALLOW_FRACTIONS = (1 / 3, 0.5)  # besides the default blocks, a shallower pair: finer, less semantic features


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


def _score_view(backbone: Backbone, view: dict, layer_sets, train, images, masks, settings: Settings,
                runtime: Runtime, progress: bool) -> list[dict]:
    """Fit every (block pair, scorer) of one view on `train`; validation figures of each."""
    tiling = Tiling(view["tile_size"], view["tile_overlap"], view["tile_scale"]) if view["tile_size"] else None
    name = f"tiles {view['tile_size']} @ x{view['tile_scale']}" if tiling else f"{view['image_size']} px"
    s = settings
    candidates = {(layers, scorer): (make_scorer(scorer, s.coreset_ratio, s.max_bank_candidates, s.seed),
                                     block_dims(layers, backbone.layers, backbone.hidden_size))
                  for layers in layer_sets for scorer in SCORERS}
    fit_candidates(backbone, candidates, train, view["image_size"], tiling, runtime.batch_size,
                   f"auto: train, {name}" if progress else None)
    for scorer, _ in candidates.values():
        scorer.finalize()
    figures = score_candidates(backbone, candidates, images, masks, view["image_size"], tiling, runtime.batch_size,
                               s.sigma, (s.top_percent,), f"auto: validation, {name}" if progress else None)
    return [{"settings": {**view, "layers": list(layers), "scorer": scorer, "scales": []},
             "val_image_auroc": f["image_auroc"], "val_aupro_0.05": f["aupro_0.05"]}
            for ((layers, scorer), _), f in figures.items()]


def choose_settings(settings: Settings, runtime: Runtime, train: Sequence[ImageLike], validation: Sequence[ImageLike],
                    progress: bool = True) -> dict:
    """Compare the candidates on validation + synthetic anomalies; return the choice and every figure.

    Backbone, base image size and scorer parameters come from `settings`. Only `train` and `validation`
    are read.
    """
    train = evenly_spaced(list(train), AUTO_TRAIN)
    good = [load_rgb(image) for image in evenly_spaced(list(validation), AUTO_VALIDATION)]
    images, masks = with_synthetic_anomalies(good, settings.seed)
    loaded = load_backbone(settings.backbone, None, runtime.device, runtime.precision)  # default blocks: the deepest
    depth = loaded.model.config.num_hidden_layers
    layer_sets = [default_layers(depth), tuple(sorted({max(1, round(depth * f)) for f in SHALLOW_FRACTIONS}))]
    backbone = Backbone(loaded.model, sorted({b for s in layer_sets for b in s}), runtime.precision)
    short_side = float(np.median([min(image.shape[:2]) for image in good]))
    rows = []
    for view in tqdm(candidate_views(settings.image_size, short_side), desc="auto: candidates", disable=not progress):
        rows += _score_view(backbone, view, layer_sets, train, images, masks, settings, runtime, progress)
    best = max(rows, key=lambda r: r["val_image_auroc"] + r["val_aupro_0.05"])
    return {"chosen": best["settings"], "rule": "max validation image AUROC + AU-PRO(0.05), synthetic anomalies",
            "train_images": len(train), "validation_images": len(good), "synthetic_images": len(images) - len(good),
            "candidates": rows}
