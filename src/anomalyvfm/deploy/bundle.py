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

from anomalyvfm.checksums import sha256
from anomalyvfm.errors import UserInputError
from anomalyvfm.files import write_edited_copy

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


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The checked manifest of a bundle; a `UserInputError` naming the file for anything unusable.

    With `verify`, every listed file must exist with its recorded SHA-256, so a truncated copy or a
    corrupted file is reported here rather than as a crash (or silently wrong scores) in the engine.
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
    for name, digest in files.items() if verify else ():
        file = directory / name
        if not file.is_file():
            raise UserInputError(f"{file}: missing from the bundle (copy the whole folder)")
        if sha256(file) != digest:
            raise UserInputError(f"{file}: corrupt (checksum differs from {MANIFEST}); copy the bundle again")
    return manifest


def write_config(source: str | Path, target: str | Path, updates: dict) -> Path:
    """Bundle `source` with `updates` merged into its manifest's config (new thresholds from `anomalyvfm
    calibrate`), written atomically at `target` (which may be `source`). The graph and scorer files are
    copied unchanged, so their checksums still hold."""
    source, target = Path(source), Path(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_bundle(target))):
        raise UserInputError(f"{target}: exists and is not a bundle or an empty folder; choose a new --out")
    manifest = read_manifest(source)
    manifest["config"] = {**manifest["config"], **updates}
    return write_edited_copy(source, target,
                             lambda tmp: (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n"))
