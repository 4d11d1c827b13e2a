"""The inference-bundle format: a folder with a manifest, the backbone graph and the scorer arrays.

    manifest.json    format version, engine format and precision, the detector's settings and
                     thresholds, the backbone's geometry, and a SHA-256 of every other file
    backbone.xml/.bin   OpenVINO IR  (format "openvino")   or   backbone.onnx  (format "onnx")
    scorer.npz       per view `view<i>.bank` (kNN) or `view<i>.mean` + `view<i>.whitener` (Mahalanobis),
                     plus `foreground.mean` / `foreground.component` when the model has a foreground model
                     and `global.embeddings` (training images' global embeddings, for image_evidence)

The graph maps `(B, 3, H, W)` float32 images in [0, 1] (H, W multiples of the patch size) to `(B, H*W/p², C)`
patch features: ImageNet normalisation, the truncated DINOv2, and each kept block's L2 normalisation are
inside it. Everything after it (scoring, view fusion, maps) is numpy code shared with the torch pipeline.
Torch-free: the runtime imports this module.
"""
from __future__ import annotations

import json
from pathlib import Path

from anomalyvfm.checksums import checked_sha256, sha256
from anomalyvfm.errors import UserInputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCORER = "scorer.npz"
FORMATS = ("openvino", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")
AUTO = "auto"  # export's choice: the fastest precision meeting parity that this machine can write
EXPORT_PRECISIONS = (AUTO, *PRECISIONS)
GRAPH_FILES = {"openvino": ("backbone.xml", "backbone.bin"), "onnx": ("backbone.onnx",)}


def is_bundle(path: str | Path) -> bool:
    """Whether `path` looks like an inference bundle (rather than a model directory)."""
    return (Path(path) / MANIFEST).is_file()


def loaded_files(fmt: str) -> tuple[str, ...]:
    """Every file of a bundle of format `fmt` that the runtime reads, besides the manifest itself."""
    return (*GRAPH_FILES[fmt], SCORER)


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The checked manifest of a bundle; a `UserInputError` naming the file for anything unusable.

    With `verify`, every file the runtime reads (`loaded_files`) must be listed, and every listed file
    must exist with its recorded SHA-256, so a truncated copy or a corrupted file is reported here rather
    than as a crash (or silently wrong scores) in the engine. A manifest that lists fewer files (an empty
    list once disabled every check) is refused: it would leave the unlisted files unchecked.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        version = int(manifest["format_version"])
        files = dict(manifest["files"])
        fmt, precision = manifest["format"], manifest["precision"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{path}: unreadable bundle manifest ({type(exc).__name__}: {exc})") from None
    if version > FORMAT_VERSION:
        raise UserInputError(f"{path}: bundle format {version} is newer than this anomalyvfm reads ({FORMAT_VERSION}); "
                             "upgrade anomalyvfm or export the model again with this version")
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise UserInputError(f"{path}: unknown format '{fmt}' or precision '{precision}'")
    unlisted = [name for name in loaded_files(fmt) if name not in files] if verify else []
    if unlisted:
        raise UserInputError(f"{path}: lists no checksum for {', '.join(unlisted)}, which the runtime reads; "
                             "the manifest is incomplete: export the model again")
    for name, digest in files.items() if verify else ():
        file = directory / name
        if not file.is_file():
            raise UserInputError(f"{file}: missing from the bundle (copy the whole folder)")
        if checked_sha256(file) != digest:
            raise UserInputError(f"{file}: corrupt (checksum differs from {MANIFEST}); copy the bundle again")
    return manifest
