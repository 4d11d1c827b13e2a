"""Patch losses for training on synthetic anomalies: plain BCE and confidence-weighted BCE for the heads,
and the compactness loss that trains the backbone for the kNN distance scorer itself.

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


def nearest_normal_distance(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every patch to its nearest patch in the OTHER crops of `bank`.

    `features` is `(B, h, w, C)`; `bank` a `(B,)` bool telling which crops are normal and serve as the
    memory. A crop is never its own memory: a patch's nearest neighbour in its own crop is its
    neighbour on the surface, not evidence of normality. Rows with no memory (the only normal crop)
    get `inf`. The square root is taken with a floor, so identical patches do not give NaN gradients.
    """
    b, h, w, c = features.shape
    tokens = features.reshape(b, h * w, c)
    memory = tokens[bank].reshape(-1, c)
    owner = torch.arange(b, device=features.device)[bank].repeat_interleave(h * w)
    squared = (tokens.pow(2).sum(-1, keepdim=True) + memory.pow(2).sum(-1) - 2 * tokens @ memory.T).clamp_min(1e-8)
    own = torch.arange(b, device=features.device)[:, None, None] == owner[None, None, :]
    squared = squared.masked_fill(own, float("inf"))
    return squared.min(dim=-1).values.sqrt().reshape(b, h, w)


def compactness_loss(features: torch.Tensor, frozen: torch.Tensor, targets: torch.Tensor, normal_crops: torch.Tensor,
                     margin: float = 0.1, distill: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Train the features for the scorer that uses them: a PatchCore-style kNN distance (Roth et al.,
    "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) with an in-batch memory bank.

    With d_i = `nearest_normal_distance` to the normal crops' patches (recomputed every step from the
    current adapter, so the memory is never stale), over normal patches N (coverage 0) and defect
    patches A (coverage >= 0.5; border patches 0 < coverage < 0.5 are ignored, as in validation):

        L = mean_N d_i                                       normal surface compact
          + mean_A relu((1 + margin) · max_N d_j − d_i)      defects beyond the farthest normal patch
          + distill · mean_N ||f_i − f_i^frozen||²           no collapse, no forgetting

    The margin is relative to the batch's farthest normal patch (detached), so it follows the scale
    of the distances as the adapter moves them; pushing against the *farthest* normal patch is what
    an image score (max over patches) needs. The distillation term is feature-level knowledge
    distillation from the frozen model (as in the student–teacher line of work, e.g. Bergmann et al.,
    CVPR 2020), here only a regulariser: the kNN scorer still compares adapted with adapted features.
    Returns the loss and its parts (floats, for logging).
    """
    distance = nearest_normal_distance(features, normal_crops)
    normal, defect = targets == 0, targets >= 0.5
    normal_d = distance[normal & torch.isfinite(distance)]
    pull = normal_d.mean()
    farthest = normal_d.detach().max()
    push = F.relu((1 + margin) * farthest - distance[defect]).mean() if defect.any() else pull.new_zeros(())
    keep = (features - frozen).pow(2).sum(-1)[normal].mean()
    loss = pull + push + distill * keep
    return loss, {"pull": pull.item(), "push": push.item(), "distill": keep.item()}
