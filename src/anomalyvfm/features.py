"""Images → patch-feature grids, batched through the backbone with bounded memory.

Images are decoded in a background thread while the backbone runs, grouped into batches of equal
processed size (a category's images usually share one size; mixed folders fall back to smaller batches)
and yielded one by one in input order, so callers never hold more than one batch of features. An
image that cannot be read is yielded as a failure instead of stopping the run.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from anomalyvfm.backbone import Backbone
from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import processed_size, to_tensor
from anomalyvfm.errors import ImageReadError

T = TypeVar("T")
R = TypeVar("R")


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
    """An input that could not be read; `error` is a one-line message naming it."""

    index: int
    source: str
    error: str


def describe(image: ImageLike, index: int) -> str:
    """A name for an input in messages and reports: its path, or its position for in-memory images."""
    return str(image) if isinstance(image, str) or hasattr(image, "__fspath__") else f"<image {index}>"


def prefetch(fn: Callable[[T], R], items: Iterable[T], depth: int = 4) -> Iterator[R]:
    """`map(fn, items)` computed up to `depth` items ahead in a thread (decoding overlaps compute)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _load(indexed: tuple[int, ImageLike]) -> tuple[int, str, np.ndarray | str]:
    index, image = indexed
    try:
        return index, describe(image, index), load_rgb(image)
    except ImageReadError as exc:
        return index, describe(image, index), str(exc)


def extract_features(
    backbone: Backbone,
    images: Sequence[ImageLike],
    image_size: int,
    batch_size: int = 8,
    progress: str | None = None,
) -> Iterator[ImageFeatures | FailedImage]:
    """Yield, in input order, the patch features of each image (or a `FailedImage`)."""
    device = backbone.device
    batch: list[tuple[int, str, tuple[int, int], torch.Tensor]] = []

    def flush() -> Iterator[ImageFeatures]:
        with torch.inference_mode():
            grids = backbone(torch.stack([t for *_, t in batch]).to(device)).cpu()
        for (index, source, shape, tensor), grid in zip(batch, grids):
            yield ImageFeatures(index, source, grid, shape, tuple(tensor.shape[1:]))
        batch.clear()

    bar = tqdm(total=len(images), desc=progress, disable=progress is None, unit="img")
    for index, source, loaded in prefetch(_load, enumerate(images)):
        if isinstance(loaded, str):
            yield from flush() if batch else ()
            yield FailedImage(index, source, loaded)
        else:
            size = processed_size(*loaded.shape[:2], image_size, backbone.patch_size)
            if batch and (len(batch) >= batch_size or tuple(batch[0][3].shape[1:]) != size):
                yield from flush()
            batch.append((index, source, loaded.shape[:2], to_tensor(loaded, size)))
        bar.update(1)
    if batch:
        yield from flush()
    bar.close()
