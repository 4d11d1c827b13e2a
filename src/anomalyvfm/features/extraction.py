"""Images → patch-feature grids, batched through the backbone with bounded memory.

Images are decoded in a background thread while the backbone runs, cut into crops (the whole image, or
overlapping tiles), grouped into batches of equal-size crops and yielded one by one in input order, so
callers never hold more than one batch of features. An image that cannot be read is yielded as a
failure instead of stopping the run, and so is one whose processing fails: a backbone batch that raises
(out of memory included) is retried image by image, so only the image that fails is lost.

Tiling (`Tiling`) serves high-resolution images: the image is resized by `scale` (sides rounded to
patch multiples) and cut into `size`-px tiles at patch-aligned offsets, so every tile's patches fall
exactly on the global patch grid. The per-tile grids are stitched into one global grid, features of
patches seen by several tiles averaged. Features are averaged rather than per-tile scores because the
scorer, the maps and the foreground mask then see one grid per image, exactly as without tiling, and
training images (stitched the same way) give the scorer the same statistics it meets at test time.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomalyvfm.features.backbone import Backbone
from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import to_tensor
from anomalyvfm.errors import ImageReadError, failure
from anomalyvfm.features.tiles import Tiling, crops, describe, prefetch, view_size


@dataclass
class ImageFeatures:
    """Patch features of one image: `features` is `(h, w, C)`; sizes are (height, width) in pixels."""

    index: int
    source: str
    features: torch.Tensor
    image_shape: tuple[int, int]
    processed_shape: tuple[int, int]


@dataclass
class FailedImage:
    """An input that could not be read or processed; `error` is a one-line message naming it."""

    index: int
    source: str
    error: str


def _load(indexed: tuple[int, ImageLike], max_aspect: float | None) -> tuple[int, str, np.ndarray | str]:
    index, image = indexed
    source = describe(image, index)
    try:
        return index, source, load_rgb(image, max_aspect=max_aspect)
    except ImageReadError as exc:
        return index, source, str(exc)
    except Exception as exc:  # e.g. MemoryError decoding a huge file: that image fails, the run goes on
        return index, source, failure(source, exc)


class _Stitch:
    """One image's crops in flight: their patch grids are summed into the image's global grid."""

    def __init__(self, index: int, source: str, image_shape: tuple[int, int], tensor: torch.Tensor,
                 crops: list[tuple[int, int, torch.Tensor]], patch_size: int, hidden_size: int) -> None:
        self.index, self.source, self.image_shape = index, source, image_shape
        self.processed_shape = tuple(tensor.shape[1:])
        self.grid_shape = (self.processed_shape[0] // patch_size, self.processed_shape[1] // patch_size)
        self.crops, self.patch_size, self.hidden_size = crops, patch_size, hidden_size
        self.pending = len(crops)
        self.total: torch.Tensor | None = None
        self.error: str | None = None  # set when one of its crops failed: the image is then yielded as failed

    def add(self, top: int, left: int, grid: torch.Tensor) -> None:
        if self.total is None:
            self.total = grid.new_zeros((*self.grid_shape, grid.shape[-1]))
        top, left = top // self.patch_size, left // self.patch_size
        self.total[top : top + grid.shape[0], left : left + grid.shape[1]] += grid
        self.pending -= 1

    def fail(self, error: str) -> None:
        """One crop could not be processed: drop what was summed, count the crop as done."""
        self.error = self.error or error
        self.total = None
        self.pending -= 1

    def result(self) -> ImageFeatures | FailedImage:
        """The stitched grid (or the failure). The sum of unit vectors is renormalised per block, which is the normalised
        average, so each block's part stays unit-norm as `Backbone.forward` promises; a single crop
        already is, and is passed through untouched."""
        if self.error is not None:
            return FailedImage(self.index, self.source, self.error)
        grid = self.total
        if len(self.crops) > 1:
            grid = F.normalize(grid.unflatten(-1, (-1, self.hidden_size)), dim=-1).flatten(-2)
        return ImageFeatures(self.index, self.source, grid, self.image_shape, self.processed_shape)


def _forward(backbone: Backbone, crops: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return backbone(torch.stack(crops).to(backbone.device)).cpu()


def _run_batch(backbone: Backbone, batch: list[tuple[_Stitch, int, int, torch.Tensor]]) -> None:
    """Run a batch of crops (one shape) through the backbone and add each grid to its image's stitch.

    One crop's failure (out of memory …) must not take the batch down: the crops are then retried one by
    one, and only the image whose crop fails again fails. Crops of an image that already failed are skipped.
    """
    live = [item for item in batch if item[0].error is None]
    for stitch, *_ in batch:
        if stitch.error is not None:
            stitch.pending -= 1  # a crop of an image that already failed: not worth computing
    try:
        done = list(zip(live, _forward(backbone, [crop for *_, crop in live]))) if live else []
    except Exception:
        done = []
        for item in live:
            try:
                done.append((item, _forward(backbone, [item[3]])[0]))
            except Exception as exc:
                item[0].fail(failure(item[0].source, exc))
    for (stitch, top, left, _), grid in done:
        if stitch.error is None:
            stitch.add(top, left, grid)
        else:
            stitch.pending -= 1


def _stitch(backbone: Backbone, index: int, source: str, loaded: np.ndarray, image_size: int,
            tiling: Tiling | None) -> _Stitch | FailedImage:
    """An image resized for its view and cut into crops, or its failure (resizing a huge image can run out
    of memory: only this image fails)."""
    try:
        height, width = loaded.shape[:2]
        tensor = to_tensor(loaded, view_size(height, width, image_size, tiling, backbone.patch_size))
        return _Stitch(index, source, (height, width), tensor, crops(tensor, tiling), backbone.patch_size,
                       backbone.hidden_size)
    except Exception as exc:
        return FailedImage(index, source, failure(source, exc))


def extract_features(
    backbone: Backbone,
    images: Sequence[ImageLike],
    image_size: int,
    batch_size: int = 8,
    progress: str | None = None,
    tiling: Tiling | None = None,
    max_aspect: float | None = None,
) -> Iterator[ImageFeatures | FailedImage]:
    """Yield, in input order, the patch features of each image (or a `FailedImage`).

    Without `tiling` the image's short side goes to `image_size`, and an image whose aspect ratio is over
    `max_aspect` is refused from its header (its backbone input would be `max_aspect` times as long); with
    tiling, `image_size` and `max_aspect` are unused (work is bounded by the pixel count) and `batch_size`
    counts tiles. Crops of one shape are batched across images; results leave in input order.
    """
    batch: list[tuple[_Stitch, int, int, torch.Tensor]] = []
    in_flight: deque[_Stitch | FailedImage] = deque()

    def finished() -> Iterator[ImageFeatures | FailedImage]:
        while in_flight and (isinstance(in_flight[0], FailedImage) or in_flight[0].pending == 0):
            item = in_flight.popleft()
            yield item if isinstance(item, FailedImage) else item.result()

    bar = tqdm(total=len(images), desc=progress, disable=progress is None, unit="img")
    load = partial(_load, max_aspect=None if tiling else max_aspect)
    for index, source, loaded in prefetch(load, enumerate(images)):
        item = FailedImage(index, source, loaded) if isinstance(loaded, str) else _stitch(
            backbone, index, source, loaded, image_size, tiling)
        del loaded
        in_flight.append(item)
        for top, left, crop in item.crops if isinstance(item, _Stitch) else ():
            if batch and (len(batch) >= batch_size or batch[0][3].shape != crop.shape):
                _run_batch(backbone, batch)
                batch.clear()
                yield from finished()
            batch.append((item, top, left, crop))
        yield from finished()
        bar.update(1)
    if batch:
        _run_batch(backbone, batch)
    yield from finished()
    bar.close()
