"""Patch losses for training on synthetic anomalies: plain BCE and confidence-weighted BCE.

A patch's target is soft: y = the fraction of its pixels inside the synthetic mask. Half-covered
patches on a defect's border are ambiguous — the patch feature mixes defect and surface, and the
synthetic mask's edge is itself approximate — so the confidence-weighted loss trusts them less:

    c_i = |2 y_i − 1|                      (0 for a half-covered patch, 1 for fully in or out)
    w_i = N · softmax_i(c_i / τ)           (over all N patches of the batch; mean weight 1)
    L   = (1/N) Σ_i w_i · BCE(logit_i, y_i)

τ → ∞ gives w_i = 1, i.e. plain BCE; a small τ puts almost all weight on confident patches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalyvfm.adaptation.config import LOSSES



def patch_targets(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, H, W)` masks (H, W multiples of `patch_size`) → `(B, h, w)` fraction of each patch covered."""
    return F.avg_pool2d(masks.float().unsqueeze(1), patch_size).squeeze(1)


def confidence_weights(targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = N · softmax(|2y − 1| / τ) over all patches of the batch, shaped like `targets`."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    confidence = (2 * targets - 1).abs().reshape(-1)
    return (confidence.numel() * torch.softmax(confidence / temperature, dim=0)).reshape(targets.shape)


def patch_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "confidence", temperature: float = 0.5) -> torch.Tensor:
    """Mean patch BCE, confidence-weighted (`kind="confidence"`) or plain (`kind="bce"`); see module doc."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if kind == "bce":
        return bce.mean()
    if kind == "confidence":
        return (confidence_weights(targets, temperature).detach() * bce).mean()
    raise ValueError(f"unknown loss '{kind}' (choose from {', '.join(LOSSES)})")
