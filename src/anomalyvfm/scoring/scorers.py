"""Patch scorers: how far a patch feature is from the normal ones.

Both scorers are position-independent (a patch is compared with normal patches from anywhere), fitted
incrementally so that training features never have to be held in memory all at once, and serialisable
to plain tensors for safetensors.

* `MahalanobisScorer` — one Gaussian over all normal patch features. The covariance is shrunk towards a
  scaled identity with the Oracle Approximating Shrinkage (OAS) estimate, computed from streamed sums,
  plus a small ridge: the prototype inverted a raw covariance of fewer samples than dimensions.
* `KNNScorer` — PatchCore-style memory bank reduced by greedy k-center coreset selection; a patch's score
  is its cosine distance to the nearest bank entry. The candidates are a seeded reservoir of
  `max_candidates` patches (`bank="reservoir"`, default) or every training patch, reduced chunk by
  chunk within the same memory (`bank="merge"`, see `coreset.StreamingCoreset`).

Out-of-fold scores (fit time only): `partial_fit(features, image)` tells a scorer which training image
the features come from. The kNN scorer then carries each candidate's image index through the reservoir,
merges and the coreset (`bank_sources`), so that a training image can be scored against the bank without
its own rows; the Mahalanobis scorer keeps the streamed sums of `folds` image folds, and `fold_params`
gives the Gaussian of all images but one fold (totals minus that fold's sums). Neither is saved with
the model: the decisions store only what they were used for (thresholds, `head.calibration`).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from anomalyvfm.scoring.names import MEMORY_BANKS, SCORERS
from anomalyvfm.scoring.coreset import StreamingCoreset, greedy_coreset
from anomalyvfm.scoring.distances import knn_distance, mahalanobis_distance
from anomalyvfm.scoring.image_evidence import image_embedding



class PatchScorer(Protocol):
    name: str

    def partial_fit(self, features: torch.Tensor, image: int = -1) -> None: ...
    def finalize(self) -> None: ...
    def score(self, features: torch.Tensor) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...


def oas_shrinkage(cov: np.ndarray, n_samples: int) -> float:
    """Oracle Approximating Shrinkage coefficient (Chen et al. 2010), as in scikit-learn's `OAS`."""
    p = cov.shape[0]
    mu = np.trace(cov) / p
    alpha = float(np.mean(cov**2))
    den = (n_samples + 1) * (alpha - mu**2 / p)
    return 1.0 if den <= 0 else min((alpha + mu**2) / den, 1.0)


class MahalanobisScorer:
    """Mahalanobis distance to a shrunk Gaussian of normal patch features."""

    name = "mahalanobis"

    def __init__(self, ridge: float = 1e-3, folds: int = 0) -> None:
        self.ridge, self.folds = ridge, folds
        self._n = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._fold_sums: list[list] = []  # per fold: [n, sum, outer] of its images (only with folds)
        self.fold_params: list[tuple[np.ndarray, np.ndarray]] = []  # per fold: (mean, whitener) without it
        self.mean: torch.Tensor | None = None
        self.whitener: torch.Tensor | None = None  # L with L L^T = precision
        self.shrinkage: float | None = None

    def partial_fit(self, features: torch.Tensor, image: int = -1) -> None:
        """Add one image's features; with `folds`, also to the sums of fold `image % folds`."""
        x = features.reshape(-1, features.shape[-1]).double()
        if self._sum is None:
            self._sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self._fold_sums = [[0, torch.zeros_like(self._sum), torch.zeros_like(self._outer)]
                               for _ in range(self.folds)]
        total, outer = x.sum(0), x.T @ x
        self._sum += total
        self._outer += outer
        self._n += x.shape[0]
        if self.folds and image >= 0:
            fold = self._fold_sums[image % self.folds]
            fold[0] += x.shape[0]
            fold[1] += total
            fold[2] += outer

    def subset(self, dims: torch.Tensor) -> "MahalanobisScorer":
        """An unfinalised scorer over feature dimensions `dims`, sharing these streamed sums.

        One pass over the training images then fits every block combination (layer selection).
        """
        sub = MahalanobisScorer(self.ridge)
        sub._n, sub._sum, sub._outer = self._n, self._sum[dims], self._outer[dims][:, dims]
        return sub

    def merge(self, other: "MahalanobisScorer") -> None:
        """Add another unfinalised scorer's streamed sums (fitted on other images, e.g. on another worker).

        Sums add exactly, so the merged scorer finalises to what one pass over all images gives, up to
        float64 rounding of the summation order.
        """
        if self.mean is not None or other.mean is not None:
            raise ValueError("merge unfinalised scorers only")
        if other._sum is None:
            return
        if self._sum is None:
            self._sum, self._outer = other._sum.clone(), other._outer.clone()
        else:
            self._sum += other._sum
            self._outer += other._outer
        self._n += other._n

    def finalize(self) -> None:
        if self._n < 2:
            raise ValueError("Mahalanobis scorer needs at least 2 patch features")
        mean, whitener, self.shrinkage = self._gaussian(self._n, self._sum, self._outer)
        self.mean, self.whitener = torch.from_numpy(mean), torch.from_numpy(whitener)
        # a fold holding every image (fewer images than folds) has no out-of-fold Gaussian: it gets none
        self.fold_params = [self._gaussian(self._n - n, self._sum - s, self._outer - o)[:2]
                            for n, s, o in self._fold_sums if self._n - n >= 2]
        if len(self.fold_params) != len(self._fold_sums):
            self.fold_params = []
        self._sum = self._outer = None
        self._fold_sums = []

    def _gaussian(self, n: int, total: torch.Tensor, outer: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
        """(mean, whitener, shrinkage) of `n` features from their streamed sums, as float32."""
        mean = total / n
        cov = ((outer - n * torch.outer(mean, mean)) / (n - 1)).numpy()
        shrinkage = oas_shrinkage(cov, n)
        mu = np.trace(cov) / cov.shape[0]
        shrunk = (1 - shrinkage) * cov + (shrinkage + self.ridge) * mu * np.eye(cov.shape[0])
        precision = np.linalg.inv(shrunk)
        precision = (precision + precision.T) / 2
        return mean.float().numpy(), np.linalg.cholesky(precision).astype(np.float32), shrinkage

    def score(self, features: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(mahalanobis_distance(features, self.mean.numpy(), self.whitener.numpy()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "whitener": self.whitener, "shrinkage": torch.tensor([self.shrinkage])}


class KNNScorer:
    """Nearest-neighbour cosine distance to a coreset memory bank of normal patches."""

    name = "knn"

    def __init__(self, coreset_ratio: float = 0.1, max_candidates: int = 100_000, seed: int = 0,
                 bank: str = "reservoir") -> None:
        if not 0 < coreset_ratio <= 1:
            raise ValueError("coreset_ratio must be in (0, 1]")
        if bank not in MEMORY_BANKS:
            raise ValueError(f"unknown memory bank '{bank}' (choose from {', '.join(MEMORY_BANKS)})")
        self.coreset_ratio, self.max_candidates, self.seed = coreset_ratio, max_candidates, seed
        self._rng = np.random.default_rng(seed)
        self._reservoir: torch.Tensor | None = None
        self._sources: torch.Tensor | None = None  # int32 training-image index of each reservoir row
        self._seen = 0
        self._stream = StreamingCoreset(max_candidates, coreset_ratio, seed) if bank == "merge" else None
        self.bank: torch.Tensor | None = None
        self.bank_sources: np.ndarray | None = None  # image index of each bank row (fit time; -1 unknown)

    def partial_fit(self, features: torch.Tensor, image: int = -1) -> None:
        """Reservoir sampling (Algorithm R, vectorised): every patch seen has equal chance to be kept;
        or, with `bank="merge"`, every patch goes through the streaming coreset. `features` are all from
        training image `image` (its index is kept with each row, for out-of-fold scores)."""
        x = F.normalize(features.reshape(-1, features.shape[-1]).float(), dim=1)
        if self._stream is not None:
            self._stream.add(x, image)
            return
        if self._reservoir is None:
            self._reservoir = torch.empty(0, x.shape[1])
            self._sources = torch.empty(0, dtype=torch.int32)
        room = self.max_candidates - len(self._reservoir)
        if room > 0:
            self._reservoir = torch.cat([self._reservoir, x[:room]])
            self._sources = torch.cat([self._sources, torch.full((len(x[:room]),), image, dtype=torch.int32)])
            self._seen += min(room, len(x))
            x = x[room:]
        if len(x):
            slots = self._rng.integers(0, self._seen + np.arange(1, len(x) + 1))
            keep = slots < self.max_candidates
            # duplicate slots within one call all come from the same image: sources stay consistent
            self._reservoir[torch.from_numpy(slots[keep])] = x[torch.from_numpy(keep)]
            self._sources[torch.from_numpy(slots[keep])] = image
            self._seen += len(x)

    def merge(self, other: "KNNScorer") -> None:
        """Combine another unfinalised scorer's reservoir (of other patches) into this one.

        Each reservoir is a uniform sample without replacement of the patches its scorer saw. How many
        of the merged `max_candidates` slots come from each side is drawn from the hypergeometric
        distribution of a uniform sample of the union (n_self + n_other patches), and that many are taken
        uniformly from each side's reservoir (never more than it holds, since a side keeps all it saw
        up to `max_candidates`). So the merged reservoir is a uniform sample of the union: every patch is
        kept with probability min(1, max_candidates / (n_self + n_other)), exactly as one scorer that saw
        all patches in one stream would keep it — the same distribution, not the same draw.
        """
        if self.bank is not None or other.bank is not None:
            raise ValueError("merge unfinalised scorers only")
        if self._stream is not None:  # merge-and-reduce bank: the other side's held rows stream in
            self._stream.absorb(other._stream)
            return
        if other._reservoir is None or other._seen == 0:
            return
        if self._reservoir is None or self._seen == 0:
            self._reservoir, self._sources, self._seen = other._reservoir.clone(), other._sources.clone(), other._seen
            return
        total = self._seen + other._seen
        size = min(total, self.max_candidates)
        mine = int(self._rng.hypergeometric(self._seen, other._seen, size)) if total > size else self._seen
        keep = [torch.from_numpy(self._rng.choice(len(part), count, replace=False))
                for part, count in ((self._reservoir, mine), (other._reservoir, size - mine))]
        self._reservoir = torch.cat([self._reservoir[keep[0]], other._reservoir[keep[1]]])
        self._sources = torch.cat([self._sources[keep[0]], other._sources[keep[1]]])
        self._seen = total

    def finalize(self) -> None:
        if self._stream is not None:
            if not self._stream.held:
                raise ValueError("kNN scorer needs at least 1 patch feature")
            self.bank = self._stream.result()
            self.bank_sources, self._stream = self._stream.result_sources.numpy(), None
            return
        if self._reservoir is None or len(self._reservoir) == 0:
            raise ValueError("kNN scorer needs at least 1 patch feature")
        size = max(1, round(len(self._reservoir) * self.coreset_ratio))
        selected = greedy_coreset(self._reservoir, size, self.seed)
        self.bank, self.bank_sources = self._reservoir[selected].contiguous(), self._sources[selected].numpy()
        self._reservoir = self._sources = None

    def score(self, features: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(knn_distance(features, self.bank.numpy()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}


class ImageBank:
    """Every training image's global embedding (`scoring.image_evidence`): one vector per image, all kept.

    Fitted with the patch scorers whatever `image_evidence` says (it costs one mean per image), so a
    model can be scored either way and the two compared on the same fit.
    """

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self._rows: list[np.ndarray] = []
        self.bank: torch.Tensor | None = None

    def partial_fit(self, features: torch.Tensor) -> None:
        """Add one image's `(h, w, C)` patch features."""
        self._rows.append(image_embedding(features.float().numpy(), self.blocks))

    def merge(self, other: "ImageBank") -> None:
        """Add another unfinalised bank's images (fitted on other images, e.g. on another worker)."""
        if self.bank is not None or other.bank is not None:
            raise ValueError("merge unfinalised banks only")
        self._rows += other._rows

    def finalize(self) -> None:
        if not self._rows:
            raise ValueError("image bank needs at least 1 image")
        self.bank, self._rows = torch.from_numpy(np.stack(self._rows)), []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.bank}


def make_scorer(name: str, coreset_ratio: float = 0.1, max_candidates: int = 100_000, seed: int = 0,
                bank: str = "reservoir", folds: int = 0) -> PatchScorer:
    """Build an unfitted scorer by name; `folds` > 0 makes a Mahalanobis scorer keep per-fold sums."""
    if name == "mahalanobis":
        return MahalanobisScorer(folds=folds)
    if name == "knn":
        return KNNScorer(coreset_ratio, max_candidates, seed, bank)
    raise ValueError(f"unknown scorer '{name}' (choose from {', '.join(SCORERS)})")
