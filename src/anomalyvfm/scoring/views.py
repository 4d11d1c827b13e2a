"""Several views of one image → one patch-score grid (multi-scale fusion, foreground suppression).

Each view (a short side, or tiles) has its own scorer, and each scorer's distances have their own
scale and spread, so raw scores cannot be averaged. Each view's scores are standardised by the mean
and std of its patch scores on the validation (good) images, then averaged on the finest view's grid
(where small defects are sharpest). The foreground mask, when applied, caps background scores last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from anomalyvfm.scoring.distances import fuse_views, suppress_background
from anomalyvfm.scoring.moments import RunningMoments


@dataclass
class ViewScores:
    """One image's patch-score grid per view (finest last), foreground mask, head scores and global distance.

    Small: grids of patch scores, not features, so every validation image's can be kept while calibrating.
    """

    source: str
    grids: list[torch.Tensor]
    foreground: torch.Tensor | None
    processed_shape: tuple[int, int]
    image_shape: tuple[int, int]
    head: tuple[torch.Tensor, float] | None = None  # patch logits and image logit of the reference view
    global_distance: float | None = None  # reference view's distance to the training images (image_evidence)


def view_statistics(scored: list[ViewScores]) -> list[dict[str, float]]:
    """Mean and std of each view's patch scores over `scored` (validation images)."""
    stats = []
    for grids in zip(*(item.grids for item in scored)):
        moments = RunningMoments()
        for grid in grids:
            moments.update(grid.numpy())
        stats.append({"mean": moments.mean, "std": max(moments.std, 1e-12)})
    return stats


def fuse(scored: ViewScores, view_stats: list[dict[str, float]], suppress: bool) -> torch.Tensor:
    """`(h, w)` scores on the finest view's grid: standardised views averaged, background capped if `suppress`.

    A single view keeps its scorer's own units, so single-view models behave as they always have.
    The arithmetic is `distances` (numpy), shared with the exported runtime.
    """
    grid = scored.grids[-1]
    if len(scored.grids) > 1:
        grid = torch.from_numpy(fuse_views([g.numpy() for g in scored.grids], view_stats))
    if suppress and scored.foreground is not None:
        grid = torch.from_numpy(suppress_background(grid.numpy(), scored.foreground.numpy()))
    return grid
