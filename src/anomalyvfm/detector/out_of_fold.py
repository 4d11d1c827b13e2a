"""Out-of-fold scores of the training images: hundreds of normal samples for the thresholds, at fit time.

Validation sets hold 9–29 good images, too few to show where the tail of normal scores ends. Every
training image is a normal sample too, but scored in-sample its own patches are in the bank (distance ~0).
Scored *out of fold*, against the fitted state without what came from it, it is a normal image the model
has not seen:

* kNN: each bank row carries the index of the training image it came from (`KNNScorer.bank_sources`,
  tracked through the reservoir, merges and the coreset); the image is scored against the bank with its
  own rows excluded (`head.HeldOut.bank_rows`). One bank, no refit. Removing a row the coreset chose
  leaves its region covered a little less than a refit without the image would, so out-of-fold scores
  lean high (thresholds lean towards fewer false alarms), never low.
* Mahalanobis: `OOF_FOLDS` folds by image index; fold k is scored with the Gaussian of the other folds'
  streamed sums (totals minus the fold's: `MahalanobisScorer.fold_params`).
* The global embeddings: the image's own row is left out.

Design for bounded memory: the bank exists only once every training image has been streamed, so each
image's patch features are written, as float16, to an anonymous temporary file during the fit stream
(`FeatureSpill`; features are per-block unit-norm, so float16 keeps ~3 decimal digits of each cosine)
and read back one image at a time after the bank is final. Memory stays at one image's features; disk
holds at most `OOF_MAX_IMAGES` images (evenly spaced over the training set). The cost over a fit is one
kNN search per training image (a prediction without the backbone) plus its map, no second backbone pass.
What is kept per image is its patch-score grids (`ViewScores`, kilobytes), fused with the calibration
once the validation pass has fitted it (`detector.calibration`).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from anomalyvfm.data import evenly_spaced
from anomalyvfm.features.extraction import ImageFeatures
from anomalyvfm.head.head import HeldOut, ScoringHead
from anomalyvfm.head.scores import ViewScores

OOF_FOLDS = 5  # Mahalanobis folds: each Gaussian is fitted on 80 % of the images
OOF_MAX_IMAGES = 1000  # training images scored out of fold at most (evenly spaced): bounds disk and time


@dataclass
class _Entry:
    index: int  # the image's index in the fit stream (its bank-row source and global-embedding row)
    source: str
    processed_shape: tuple[int, int]
    image_shape: tuple[int, int]
    views: list[tuple[int, tuple[int, ...]]]  # per view: (byte offset, shape)


class FeatureSpill:
    """Chosen training images' patch features in an anonymous temporary file (float16), read back in order."""

    def __init__(self, total: int, limit: int = OOF_MAX_IMAGES) -> None:
        self.chosen = set(evenly_spaced(list(range(total)), limit))
        self._file = tempfile.TemporaryFile()
        self._entries: list[_Entry] = []

    def add(self, index: int, items: list[ImageFeatures]) -> None:
        """Keep image `index`'s features of every view, if it is one of the chosen images."""
        if index not in self.chosen:
            return
        views = []
        for item in items:
            array = np.ascontiguousarray(item.features.numpy(), dtype=np.float16)
            views.append((self._file.tell(), array.shape))
            self._file.write(array.tobytes())
        ref = items[-1]
        self._entries.append(_Entry(index, ref.source, tuple(ref.processed_shape), tuple(ref.image_shape), views))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[_Entry, list[np.ndarray]]]:
        self._file.flush()
        for entry in self._entries:
            arrays = []
            for offset, shape in entry.views:
                self._file.seek(offset)
                data = self._file.read(2 * int(np.prod(shape)))
                arrays.append(np.frombuffer(data, np.float16).reshape(shape).astype(np.float32))
            yield entry, arrays

    def close(self) -> None:
        self._file.close()


def held_out(index: int, scorers: list, folds: int = OOF_FOLDS) -> HeldOut | None:
    """What to leave out for training image `index`; None when the fit cannot score it out of fold
    (its rows are the whole bank, or the scorers kept no fold Gaussians)."""
    if all(getattr(s, "bank_sources", None) is not None for s in scorers):
        rows = tuple(np.flatnonzero(s.bank_sources == index) for s in scorers)
        if any(len(r) >= len(s.bank_sources) for r, s in zip(rows, scorers)):
            return None
        return HeldOut(bank_rows=rows, global_row=index)
    if all(getattr(s, "fold_params", None) for s in scorers):
        return HeldOut(gaussians=tuple(s.fold_params[index % folds] for s in scorers), global_row=index)
    return None


def out_of_fold_scores(head: ScoringHead, scorers: list, spill: FeatureSpill) -> list[ViewScores]:
    """Every spilled training image scored through `head` without what came from it (see module doc)."""
    scored = []
    for entry, features in spill:
        held = held_out(entry.index, scorers)
        if held is not None:
            scored.append(head.score_views(features, entry.source, entry.processed_shape, entry.image_shape,
                                           None, held))
    return scored
