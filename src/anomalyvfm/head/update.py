"""Good images added to a fitted head after the fit (`anomalyvfm update`), without refitting: numpy only.

A memory-bank detector learns a normal appearance it had not seen by holding it, so a false alarm that an
operator confirms good becomes normal data without a new pass over the training set:

* kNN: the image's patches are merged into the coreset as the fit built it — greedy k-center
  (farthest-first) *given the bank as it is*, `coreset_ratio` of the new patches per view. The patches
  least like any bank row, those that raised the alarm, come first, and the bank grows in the fit's
  proportion (20 images of 1024 patches at ratio 0.1 add about 2000 rows).
* Mahalanobis: the Gaussian's moments take the new patches, each weighted as a training patch was. The
  stored state is the mean and the whitener of the *shrunk* covariance, so that covariance is the prior
  moment (its shrinkage stays in it; the new patches are not shrunk again) and the fit's patch count
  comes from the fit record.
* Global image evidence: each image's embedding is appended (one row an image, as at the fit).

The foreground model is kept as fitted. `HeldOut` records what came from each added image, so it can be
scored against the grown head without itself (its out-of-fold score), like a training image at the fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomalyvfm.head.head import HeadConfig, HeldOut
from anomalyvfm.scoring.distances import knn_distance, unit_rows
from anomalyvfm.scoring.image_evidence import image_embedding

HELD = 1e-6  # a cosine distance this small is float32 rounding: the patch is already in the bank


@dataclass
class Growth:
    """The grown head's arrays, what each added image contributed, and the rows added per view."""

    arrays: dict[str, np.ndarray]
    held_out: list[HeldOut]  # per added image, in order
    rows_added: list[int]


def merge_into_bank(bank: np.ndarray, patches: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the `patches` rows to append to the unit-norm `bank`: farthest-first from the bank and
    from each other, `ratio` of them (at least one), stopping early once every patch has a bank row at
    distance zero (`HELD`: nothing left to cover)."""
    x = unit_rows(patches)
    distance = knn_distance(x, bank)
    selected: list[int] = []
    for _ in range(max(1, round(ratio * len(x)))):
        farthest = int(np.argmax(distance))
        if distance[farthest] <= HELD:
            break
        selected.append(farthest)
        np.minimum(distance, 1 - x @ x[farthest], out=distance)
    return np.asarray(selected, dtype=np.int64)


def grown_gaussian(mean: np.ndarray, whitener: np.ndarray, count: int, total: np.ndarray,
                   outer: np.ndarray, added: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, whitener) of a Gaussian of `count` patches given by `mean` and `whitener` (L, L Lᵀ = precision)
    plus `added` patches whose sum is `total` and sum of outer products `outer` (float64)."""
    mu = mean.astype(np.float64)
    covariance = np.linalg.inv(whitener.astype(np.float64) @ whitener.T.astype(np.float64))
    n = count + added
    new_mean = (count * mu + total) / n
    scatter = (count - 1) * covariance + count * np.outer(mu, mu) + outer - n * np.outer(new_mean, new_mean)
    precision = np.linalg.inv(scatter / (n - 1))
    precision = (precision + precision.T) / 2
    return new_mean.astype(np.float32), np.linalg.cholesky(precision).astype(np.float32)


def grow(config: HeadConfig, arrays: dict[str, np.ndarray], images: list[list[np.ndarray]],
         coreset_ratio: float, fitted_images: int) -> Growth:
    """Add good `images` (each a list of every view's `(h, w, C)` features) to a head's `arrays`.

    `fitted_images`: how many images the head holds already (training images plus earlier additions), so
    the Mahalanobis moments weigh the new patches as one image's patches each.
    """
    if not images:
        raise ValueError("no images to add")
    grown = dict(arrays)
    rows: list[list[np.ndarray]] = [[] for _ in images]
    gaussians: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in images]
    added = []
    for view in range(config.views):
        flat = [np.asarray(image[view], np.float32).reshape(-1, image[view].shape[-1]) for image in images]
        if config.scorer == "knn":
            bank, patches = grown[f"view{view}.bank"], np.concatenate(flat)
            owners = np.repeat(np.arange(len(flat)), [len(f) for f in flat])
            chosen = merge_into_bank(bank, patches, coreset_ratio)
            for k in range(len(images)):
                rows[k].append(len(bank) + np.flatnonzero(owners[chosen] == k))
            grown[f"view{view}.bank"] = np.concatenate([bank, unit_rows(patches[chosen])])
            added.append(len(chosen))
            continue
        mean, whitener = grown[f"view{view}.mean"], grown[f"view{view}.whitener"]
        count = fitted_images * len(flat[0])  # the fit's patches: as many an image as these have
        sums = [(f.astype(np.float64).sum(0), f.astype(np.float64).T @ f.astype(np.float64), len(f)) for f in flat]
        total, outer, n = (sum(part[i] for part in sums) for i in range(3))
        grown[f"view{view}.mean"], grown[f"view{view}.whitener"] = grown_gaussian(mean, whitener, count, total, outer, n)
        for k, (t, o, m) in enumerate(sums):  # each image held out: the Gaussian grown by the others only
            gaussians[k].append(grown_gaussian(mean, whitener, count, total - t, outer - o, n - m)
                                if len(images) > 1 else (mean, whitener))
        added.append(0)
    global_rows: list[int | None] = [None] * len(images)
    if "global.embeddings" in grown:
        embeddings = grown["global.embeddings"]
        new = np.stack([image_embedding(np.asarray(image[-1], np.float32), config.blocks) for image in images])
        grown["global.embeddings"] = np.concatenate([embeddings, new])
        global_rows = [len(embeddings) + k for k in range(len(images))]
    held_out = [HeldOut(tuple(rows[k]), tuple(gaussians[k]), global_rows[k]) for k in range(len(images))]
    return Growth(grown, held_out, added)
