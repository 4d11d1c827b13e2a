"""Backbone forms: exported graphs of a model's backbone, and the earlier bundle format that still loads.

A *form* is a folder in a model directory, named `<format>-<precision>` (`openvino-bf16/`, `onnx-fp32/` …),
holding the graph (`backbone.xml` + `backbone.bin` for OpenVINO, `backbone.onnx` for ONNX Runtime); the model's
`config.json` describes it under `forms` (format, precision, the backbone's geometry, calibration samples) and
lists its files' checksums with the others. The graph maps `(B, 3, H, W)` float32 images in [0, 1] (H, W
multiples of the patch size) to `(B, H*W/p², C)` patch features: ImageNet normalisation, the truncated DINOv2
and each kept block's L2 normalisation are inside it. Everything after it is the model's `ScoringHead`.

Before model format 3, export wrote a separate *bundle*: `manifest.json` (format, precision, geometry, a flat
copy of the settings and thresholds, checksums), the graph, and `scorer.npz` (the head's arrays). Such bundles
still load (`read_bundle`), as a model whose one form is the bundle folder itself. Torch-free.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from anomalyvfm.checksums import verify
from anomalyvfm.detector.model_dir import FitRecord, StoredModel
from anomalyvfm.detector.settings import Settings, stored_settings
from anomalyvfm.errors import UserInputError
from anomalyvfm.head.calibration import Calibration, Thresholds

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCORER = "scorer.npz"
FORMATS = ("openvino", "onnx")
PRECISIONS = ("fp32", "bf16", "int8")
AUTO = "auto"  # export's choice: the fastest precision meeting parity that this machine can write
EXPORT_PRECISIONS = (AUTO, *PRECISIONS)
CPU_NEEDS = {"bf16": "BF16", "int8": "INT8"}  # the OpenVINO CPU optimisation capability each precision needs
GRAPH_FILES = {"openvino": ("backbone.xml", "backbone.bin"), "onnx": ("backbone.onnx",)}
# the forms, fastest first (docs/deploy.md, measured end to end on magnetic_tile: OpenVINO bf16 5.1x torch
# fp32, int8 4.0x, fp32 1.7x; ONNX Runtime int8 1.6x, fp32 1.5x)
FORM_PREFERENCE = ("openvino-bf16", "openvino-int8", "openvino-fp32", "onnx-int8", "onnx-fp32")


def form_name(fmt: str, precision: str) -> str:
    return f"{fmt}-{precision}"


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a bundle of the earlier format (rather than a model directory)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict:
    """The checked manifest of an earlier bundle; a `UserInputError` naming the file for anything unusable.

    Every file the loader reads must be listed with its SHA-256 and match it, so a truncated copy, a corrupted
    file or a manifest stripped of its list is reported here rather than as a crash (or silently wrong scores)
    in the engine.
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
    if version > BUNDLE_FORMAT_VERSION:
        raise UserInputError(f"{path}: bundle format {version} is newer than this anomalyvfm reads "
                             f"({BUNDLE_FORMAT_VERSION}); upgrade anomalyvfm or export the model again")
    if fmt not in FORMATS or precision not in PRECISIONS:
        raise UserInputError(f"{path}: unknown format '{fmt}' or precision '{precision}'")
    verify(directory, files, [SCORER, *GRAPH_FILES[fmt]], path)
    return manifest


def read_bundle(directory: str | Path) -> tuple[StoredModel, dict[str, Any]]:
    """An earlier bundle as a model (settings, calibration, record, head arrays) and its one form's description."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = manifest["config"]
    where = directory / MANIFEST
    try:
        settings = stored_settings({f.name: config[f.name] for f in fields(Settings) if f.name in config}, "settings")
        mode = config["score"]
        thresholds = Thresholds(config["image_threshold"], config["pixel_threshold"], config["validation_stats"],
                                config.get("evidence", {}))
        calibration = Calibration(mode, {mode: thresholds}, view_stats=config["view_stats"],
                                  foreground=config["foreground_stats"], image_stats=config.get("image_stats", {}))
    except (KeyError, TypeError) as exc:
        raise UserInputError(f"{where}: incomplete bundle config ({type(exc).__name__}: {exc})") from None
    record = FitRecord(config.get("train_images", 0), config.get("version", ""), config.get("fitted_at", ""))
    try:
        with np.load(directory / SCORER, allow_pickle=False) as arrays:
            head = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{directory / SCORER}: unreadable scorer arrays ({exc})") from None
    form = {key: manifest[key] for key in ("format", "precision", "backbone")}
    return StoredModel(directory, settings, calibration, record, head), form
