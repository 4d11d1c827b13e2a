"""Anomaly heads on (adapted) patch features: a logit per patch and a logit per image.

* Patch head — a small per-patch MLP, so it works on any grid size: the training crops and the full
  inference images share one head. Its `(h, w)` logit grid becomes a full-size map through the same
  upsampling and smoothing as distance scores (`maps.anomaly_map`).
* Image head — an MLP (hidden widths 2/3 and 1/3 of the input width: 512 → 256 for 768-wide
  features) on the patch features pooled with softmax weights of the patch logits. Mean pooling would
  dilute a defect covering 1 % of the image; attention on the patches the patch head finds suspicious
  keeps it visible at any image size.

Both start with a LayerNorm: the per-block L2-normalised features have entries of order 1/sqrt(width),
far from the scale the linear layers are initialised for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anomalyvfm.errors import UserInputError


class AnomalyHeads(nn.Module):
    """`forward((B, h, w, C) features) -> ((B, h, w) patch logits, (B,) image logits)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        wide, narrow = max(1, 2 * dim // 3), max(1, dim // 3)
        self.patch = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, narrow), nn.GELU(), nn.Linear(narrow, 1))
        self.image = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, wide), nn.GELU(), nn.Linear(wide, narrow), nn.GELU(),
                                   nn.Linear(narrow, 1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = features.shape
        tokens = features.reshape(b, h * w, c)
        patch_logits = self.patch(tokens).squeeze(-1)
        pooled = (patch_logits.softmax(dim=1).unsqueeze(-1) * tokens).sum(dim=1)
        return patch_logits.reshape(b, h, w), self.image(pooled).squeeze(-1)

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata={"dim": str(self.dim)})

    @classmethod
    def load(cls, path: str | Path) -> "AnomalyHeads":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                dim = int(handle.metadata()["dim"])
            heads = cls(dim)
            heads.load_state_dict(load_file(str(path)))
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise UserInputError(f"{path}: unreadable anomaly heads ({str(exc).splitlines()[0][:160]})") from None
        return heads.eval()


def head_scores(heads: AnomalyHeads, features: torch.Tensor) -> tuple[np.ndarray, float]:
    """`(h, w)` patch logits and the image logit of one image's `(h, w, C)` features (the reference view's),
    as the numpy the scoring head takes."""
    with torch.inference_mode():
        logits, image_logit = heads(features[None].float())
    return logits[0].float().numpy(), float(image_logit[0])
