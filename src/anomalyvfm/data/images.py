"""Reading images from disk into one canonical form: uint8 RGB arrays.

Industrial cameras write grayscale, 16-bit, palette and RGBA files; the backbone wants RGB. Decoding
happens here once — for files and for bytes received over the network alike — so every later stage sees
`HxWx3 uint8` and never a file format.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomalyvfm.errors import ImageReadError, ImageTooLargeError, UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ImageLike = Union[str, Path, bytes, np.ndarray, Image.Image]

# Without tiling the short side is scaled to `image_size`, so the backbone's work grows with the aspect ratio
# (tokens linearly, attention quadratically): measured with ViT-S/14 at 448 px on one CPU thread, 1:1 takes
# 0.5 s, 4:1 3.2 s and 8:1 9.7 s (and +280 MB); 20:1 took 69 s and 1:40 000 asked for 96 GB. 8:1 keeps one
# image's work within ~20 square images while still admitting line-scan strips; longer strips are served
# by tiling (`--tile-size`), whose work is bounded by the pixel count instead.
DEFAULT_MAX_ASPECT_RATIO = 8.0
ROW_CHUNK_PIXELS = 4_000_000  # pixels converted per step when rescaling 16-bit/float images


def check_shape(width: int, height: int, max_pixels: int | None, max_aspect: float | None, prefix: str = "") -> None:
    """Refuse an image by its declared size alone, before any pixel is decoded.

    Too many pixels is `ImageTooLargeError` (HTTP 413); an aspect ratio over `max_aspect` is a plain
    `ImageReadError` (HTTP 422): the file is small, but its shape is unusable without tiling.
    """
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(f"{prefix}{width}x{height} image has {pixels} pixels, over the limit of {max_pixels}")
    if max_aspect is not None and max(width, height) > max_aspect * max(min(width, height), 1):
        raise ImageReadError(f"{prefix}{width}x{height} image has an aspect ratio over the limit of {max_aspect:g}:1 "
                             f"(score such strips with tiling, --tile-size)")


@contextmanager
def _reading(prefix: str) -> Iterator[None]:
    """Translate PIL's ways of failing into `ImageReadError`/`ImageTooLargeError` prefixed with the file.

    PIL's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) applies on top of any caller limit; it
    raises `DecompressionBombError`, which is not an `OSError`, so it is caught explicitly.
    """
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{prefix}{exc}") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{prefix}cannot read image (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{prefix}cannot read image ({exc})") from None


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) declared by an encoded image's header; nothing is decoded."""
    with _reading(""), Image.open(io.BytesIO(data)) as opened:
        return opened.width, opened.height


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB; 16-bit and float images are rescaled by their own range, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raw = np.asarray(image)
        lo, hi = float(raw.min()), float(raw.max())
        scale = 65535.0 if image.mode.startswith("I;16") or hi > 255 else 255.0
        offset = 0.0
        if image.mode == "F":
            offset, scale = (lo, hi - lo) if hi > lo else (0.0, 1.0)
        out = np.empty((*raw.shape, 3), np.uint8)
        rows = max(1, ROW_CHUNK_PIXELS // max(raw.shape[1], 1))
        for top in range(0, raw.shape[0], rows):  # float64 in row chunks: bounded memory, same values
            chunk = raw[top : top + rows].astype(np.float64) - offset
            out[top : top + rows] = np.clip(chunk / scale * 255.0, 0, 255).astype(np.uint8)[..., None]
        return out
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    # convert() copies even an RGB image: skipping it saves 400 MB at the peak of a 100 MP decode.
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def load_rgb(image: ImageLike, max_pixels: int | None = None, max_aspect: float | None = None) -> np.ndarray:
    """Return an image as a contiguous `HxWx3 uint8` array; raise `ImageReadError` naming the file.

    `bytes` are an encoded image file held in memory (an upload); their errors name no file. With
    `max_pixels` / `max_aspect`, an encoded image whose header declares more pixels or a more extreme
    shape is refused before its pixels are decoded (`check_shape`), so a small compressed file cannot
    make the caller allocate gigabytes or run the backbone for a minute.
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageReadError(f"array of shape {image.shape} is not an HxW or HxWx3 image")
        check_shape(image.shape[1], image.shape[0], max_pixels, max_aspect, "<array>: ")
        return np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)
    if isinstance(image, Image.Image):
        check_shape(image.width, image.height, max_pixels, max_aspect, "<image>: ")
        return _to_rgb(image)
    if isinstance(image, bytes):
        if not image:
            raise ImageReadError("image data is empty")
        return _decode(io.BytesIO(image), "", max_pixels, max_aspect)
    path = Path(image)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    return _decode(path, f"{path}: ", max_pixels, max_aspect)


def _decode(source: Path | io.BytesIO, prefix: str, max_pixels: int | None, max_aspect: float | None) -> np.ndarray:
    """Decode one encoded image; `prefix` names it in errors."""
    with _reading(prefix), Image.open(source) as opened:
        check_shape(opened.width, opened.height, max_pixels, max_aspect, prefix)
        opened.load()
        return _to_rgb(opened)


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a boolean array (any non-zero pixel is a defect).

    A missing mask for a defective image means the annotation is lost, which would silently turn the
    image into a defect-free one in pixel metrics, so it is an error rather than an empty mask.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            mask = np.asarray(opened.convert("L")) > 0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"{path}: cannot read mask ({exc})") from None
    if shape is not None and mask.shape != tuple(shape):
        raise ImageReadError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}")
    return mask


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files directly inside `folder`; error if the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files
