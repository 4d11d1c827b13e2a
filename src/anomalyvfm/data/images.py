"""Reading images from disk into one canonical form: uint8 RGB arrays.

Industrial cameras write grayscale, 16-bit, palette and RGBA files; the backbone wants RGB. Decoding
happens here once — for files and for bytes received over the network alike — so every later stage sees
`HxWx3 uint8` and never a file format.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomalyvfm.errors import ImageReadError, ImageTooLargeError, UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ImageLike = Union[str, Path, bytes, np.ndarray, Image.Image]


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to RGB; 16-bit and float images are rescaled by their own range, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 65535.0 if image.mode.startswith("I;16") or hi > 255 else 255.0
        if image.mode == "F":
            lo, scale = (lo, hi - lo) if hi > lo else (0.0, 1.0)
            arr = arr - lo
        arr = np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(image: ImageLike, max_pixels: int | None = None) -> np.ndarray:
    """Return an image as a contiguous `HxWx3 uint8` array; raise `ImageReadError` naming the file.

    `bytes` are an encoded image file held in memory (an upload); their errors name no file. With
    `max_pixels`, an encoded image whose header declares more pixels is refused before its pixels are
    decoded, so a small compressed file cannot make the caller allocate gigabytes.
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageReadError(f"array of shape {image.shape} is not an HxW or HxWx3 image")
        return np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, bytes):
        if not image:
            raise ImageReadError("image data is empty")
        return _decode(io.BytesIO(image), "", max_pixels)
    path = Path(image)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    return _decode(path, f"{path}: ", max_pixels)


def _decode(source: Path | io.BytesIO, prefix: str, max_pixels: int | None) -> np.ndarray:
    """Decode one encoded image; `prefix` names it in errors.

    PIL's own decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) still applies on top of `max_pixels`;
    it raises `DecompressionBombError`, which is not an `OSError`, so it is caught here explicitly.
    """
    try:
        with Image.open(source) as opened:
            pixels = opened.width * opened.height
            if max_pixels is not None and pixels > max_pixels:
                raise ImageTooLargeError(f"{prefix}{opened.width}x{opened.height} image has {pixels} pixels, "
                                         f"over the limit of {max_pixels}")
            opened.load()
            return _to_rgb(opened)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{prefix}{exc}") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{prefix}cannot read image (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{prefix}cannot read image ({exc})") from None


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
