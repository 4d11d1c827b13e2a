"""Comparing candidate settings on validation data: fit several scorers on shared features, score good
validation images plus synthetic anomalies made on them, and compute each candidate's figures.

Real defects are not available before deployment and test labels must never steer a setting (MVTec AD 2
protocol), so synthetic anomalies stand in for them. Used by `--auto` (`detector.auto`) and by
`benchmarks/choose_settings.py`; both run the backbone once per view and derive every candidate (block
subset × scorer) from those features.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np
import torch

from anomalyvfm.data.images import ImageLike
from anomalyvfm.data.synthesis import SynthesisConfig, synthetic_set
from anomalyvfm import metrics as M
from anomalyvfm.features.backbone import Backbone
from anomalyvfm.features.extraction import FailedImage, extract_features
from anomalyvfm.features.tiles import Tiling
from anomalyvfm.maps.anomaly_maps import anomaly_map
from anomalyvfm.scoring.pooling import image_score
from anomalyvfm.scoring.scorers import PatchScorer

Candidates = dict[Hashable, tuple[PatchScorer, torch.Tensor]]  # key → (scorer, feature columns it reads)


def block_dims(layers: Sequence[int], loaded: Sequence[int], hidden: int) -> torch.Tensor:
    """Feature columns of blocks `layers` in the features of a backbone that returns blocks `loaded`."""
    return torch.cat([torch.arange(loaded.index(b) * hidden, (loaded.index(b) + 1) * hidden) for b in layers])


def with_synthetic_anomalies(good: list[np.ndarray], seed: int, config: SynthesisConfig = SynthesisConfig()
                             ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """The good images followed by synthetic anomalies made on them (a third as many per stage of `config`,
    at least one); masks None for the good ones."""
    synthetic = synthetic_set(good, per_stage=max(1, len(good) // 3), seed=seed, config=config)
    return good + [image for image, _, _ in synthetic], [None] * len(good) + [mask for _, mask, _ in synthetic]


def fit_candidates(backbone: Backbone, candidates: Candidates, train: Sequence[ImageLike], image_size: int,
                   tiling: Tiling | None, batch_size: int, progress: str | None) -> None:
    """Stream `train` through the backbone once; every candidate's scorer sees its columns (not finalised)."""
    for item in extract_features(backbone, train, image_size, batch_size, progress, tiling):
        if isinstance(item, FailedImage):
            continue  # the fit that follows the choice reports unreadable training images
        flat = item.features.reshape(-1, item.features.shape[-1])
        for scorer, dims in candidates.values():
            scorer.partial_fit(flat[:, dims])


def score_candidates(backbone: Backbone, candidates: Candidates, images: Sequence[ImageLike],
                     masks: Sequence[np.ndarray | None], image_size: int, tiling: Tiling | None, batch_size: int,
                     sigma: float, top_percents: Sequence[float], progress: str | None) -> dict[tuple, dict[str, float]]:
    """Image AUROC and AU-PRO(0.05) of every (candidate key, top %) on `images` (`masks[i]` None: good)."""
    grids: dict[Hashable, list[torch.Tensor]] = {key: [] for key in candidates}
    shapes = []
    for item in extract_features(backbone, images, image_size, batch_size, progress, tiling):
        if isinstance(item, FailedImage):
            raise ValueError(f"candidate images must be readable: {item.error}")
        h, w, dim = item.features.shape
        flat = item.features.reshape(h * w, dim)
        for key, (scorer, dims) in candidates.items():
            grids[key].append(scorer.score(flat[:, dims]).reshape(h, w))
        shapes.append((item.processed_shape, item.image_shape))
    labels = np.array([m is not None for m in masks], int)
    truth = [m if m is not None else np.zeros(shape, bool) for m, (_, shape) in zip(masks, shapes)]
    figures = {}
    for key, patch_grids in grids.items():
        maps = [anomaly_map(g, p, s, sigma).astype(np.float16) for g, (p, s) in zip(patch_grids, shapes)]
        aupro = M.aupro(truth, maps, 0.05)
        for top in top_percents:
            scores = np.array([image_score(g, top) for g in patch_grids])
            figures[key, top] = {"image_auroc": M.image_auroc(labels, scores), "aupro_0.05": aupro}
    return figures
