"""Torch-free parts of feature extraction, shared with the exported runtime: decoding ahead in a thread,
input names, and the tile geometry (`Tiling`; see `extraction` for why tiles are stitched as features)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from anomalyvfm.data.images import ImageLike
from anomalyvfm.data.transforms import processed_size, scaled_size

T = TypeVar("T")
R = TypeVar("R")
ArrayT = TypeVar("ArrayT")  # numpy array or torch tensor: only .shape and slicing are used


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


@dataclass(frozen=True)
class Tiling:
    """Score an image as overlapping `size`-px tiles of the image resized by `scale` (px are backbone px)."""

    size: int
    overlap: int
    scale: float = 1.0

    def starts(self, length: int) -> list[int]:
        """Tile offsets along a side of `length` px: every `size - overlap` px, the last one flush with the end."""
        if length <= self.size:
            return [0]
        return list(range(0, length - self.size, self.size - self.overlap)) + [length - self.size]


def view_size(height: int, width: int, image_size: int, tiling: Tiling | None, patch: int) -> tuple[int, int]:
    """Backbone-side size of an image: short side `image_size`, or, when tiling, the image scaled by `tiling.scale`."""
    return scaled_size(height, width, tiling.scale, patch) if tiling else processed_size(height, width, image_size, patch)


def crops(tensor: ArrayT, tiling: Tiling | None) -> list[tuple[int, int, ArrayT]]:
    """(top, left, crop) of a `3xHxW` array or tensor: the whole image, or each tile (views, not copies)."""
    height, width = tensor.shape[1:]
    if tiling is None:
        return [(0, 0, tensor)]
    th, tw = min(tiling.size, height), min(tiling.size, width)
    return [(top, left, tensor[:, top : top + th, left : left + tw])
            for top in tiling.starts(height) for left in tiling.starts(width)]
