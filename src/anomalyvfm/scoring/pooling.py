"""Patch scores → one image score."""
from __future__ import annotations

import torch


def image_score(patch_scores: torch.Tensor, top_percent: float = 1.0) -> float:
    """Mean of the highest `top_percent` % of patch scores (at least one patch).

    A max would hang the decision on one noisy patch; a mean over all would drown a small defect.
    """
    flat = patch_scores.reshape(-1).float()
    k = max(1, int(round(flat.numel() * top_percent / 100.0)))
    return float(flat.topk(k).values.mean())
