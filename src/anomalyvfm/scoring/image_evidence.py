"""Image-level (global) evidence for the image score, in numpy: shared with the torch-free runtime.

The patch scores see each patch alone, so an anomaly made only of normal-looking patches — a missing or
duplicated part, a colour shift of the whole part — leaves them quiet. The image embedding here is the
mean of each kept block's (unit-norm) patch tokens, renormalised per block: it costs nothing beyond the
patch features every path already computes, including the exported graph, whose output is exactly these
tokens (a CLS token or a deeper block would need another graph output). Its evidence is the mean cosine
distance to the `GLOBAL_K` nearest training images' embeddings; every training image is kept (one vector
each, N is small).

With `image_evidence="patch+global"` the image score is the sum of both evidences, each standardised by
its mean and std over the validation (good) images, as views are fused (`head.scores`): "one std above
normal" then counts the same in both, and an image anomalous in either way stands out. A model that learnt
labelled defects adds a third term the same way, "defects" (`head.defects`: how much nearer its top patches
are to known defect patches than to normal ones), so an evidence reads `patch[+global][+defects]`.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

GLOBAL_K = 3  # nearest training images averaged: one neighbour alone makes a near-duplicate decide


def image_embedding(features, blocks: int) -> np.ndarray:
    """`(C,)` unit-norm embedding of one image's `(h, w, C)` patch features, `C` = `blocks` x hidden size.

    Each block's mean token is normalised on its own, so every block weighs the same, as in the patch
    features; the concatenation is then divided by sqrt(blocks) to make it unit-norm as a whole.
    """
    x = np.asarray(features, dtype=np.float32)
    means = x.reshape(-1, blocks, x.shape[-1] // blocks).mean(axis=0, dtype=np.float64)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return (means.reshape(-1) / np.sqrt(blocks)).astype(np.float32)


def global_distance(embedding: np.ndarray, bank: np.ndarray, k: int = GLOBAL_K) -> float:
    """Mean cosine distance of a unit-norm `embedding` to its `k` nearest rows of the unit-norm `bank`."""
    similarity = np.asarray(bank, np.float32) @ np.asarray(embedding, np.float32)
    k = min(k, len(similarity))
    return float(1.0 - np.partition(similarity, len(similarity) - k)[len(similarity) - k :].mean(dtype=np.float64))


def fuse_image_evidence(patch: float, terms: Mapping[str, float | None], stats: dict[str, list[float]],
                        evidence: str) -> float:
    """The image score under `evidence`: the patch score itself ("patch"), or the sum of the standardised patch
    score and each further term the evidence names ("patch+global", "patch+defects", …; `terms` holds their
    values, `stats` the validation [mean, std] of each and of "patch")."""
    names = evidence.split("+")[1:]
    if not names:
        return patch
    missing = [name for name in names if terms.get(name) is None or name not in stats]
    if missing or "patch" not in stats:
        raise ValueError(f"{evidence} evidence needs the {', '.join(missing or ['patch'])} value and its validation statistics")
    return float(sum((value - stats[name][0]) / max(stats[name][1], 1e-12)
                     for name, value in (("patch", patch), *((name, terms[name]) for name in names))))


def evidence_stats(patch: list[float], terms: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """[mean, std] of the patch image scores and of each further term over validation (good) images."""
    return {name: [float(np.mean(v, dtype=np.float64)), float(np.std(v, dtype=np.float64))]
            for name, v in (("patch", patch), *terms.items())}
