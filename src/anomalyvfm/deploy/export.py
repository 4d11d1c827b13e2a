"""Export a model's backbone to a graph form (`bundle`) in its model directory, runnable without torch.

* The graph is the backbone's `patch_features` with ImageNet normalisation in front: dynamic batch,
  height and width, so one graph serves every image shape and every view (short sides, tiles).
* The head stays outside the graph, as the model's arrays (`head.safetensors`), chosen by measuring on magnetic_tile
  (ViT-S/14, 448 px, 9280-entry bank): the kNN product in the backbone graph would run at the graph's
  precision, and bf16 similarities (≈ 0.9–1.0, 3 significant digits) are too coarse for distances of
  ~0.05–0.3. Instead the runtime searches the bank in its own small OpenVINO graph — a bf16 shortlist
  re-ranked exactly in fp32 (`head.search.OpenVinoSearch`): 2x faster than numpy's fp32 product (0.49 → 0.24 s
  per image under load), distances within 2e-6 relative. Mahalanobis is one 768x768 product: numpy.
* A LoRA-adapted backbone is exported with the adapter merged into its weights (peft `merge_and_unload`
  on a copy), so the form needs neither peft nor the adapter files; head/fusion score modes need the
  torch heads and are refused.
* `bf16` is the fp32 graph compiled with OpenVINO's bf16 inference precision (AMX/AVX-512 BF16 CPUs);
  `int8` is NNCF post-training quantisation calibrated on the images given (the model's own train or
  validation good images — never test images). `auto` (the CLI default) takes the fastest precision that
  met the parity bounds on real data among those possible here (docs/deploy.md, magnetic_tile, side by
  side: OpenVINO bf16 5.1×, int8 4.0×, fp32 1.7× torch fp32 end to end; the backbone alone 322 ms bf16
  against 394 ms int8 — AMX runs bf16 matrix products faster than NNCF's int8 graph with its
  (de)quantisation steps): bf16 for OpenVINO on a CPU with bf16 units, else int8 when NNCF is installed
  and calibration images are given (int8 units are far more common than bf16 ones), else fp32.
* The model directory is rewritten atomically with the new form (`model_dir.write`): an interrupted or
  failed export leaves the model as it was.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyvfm.deploy.bundle import AUTO, FORMATS, GRAPH_FILES, PRECISIONS, form_name
from anomalyvfm.deploy.runtime import view_crops
from anomalyvfm.detector import model_dir
from anomalyvfm.errors import ImageReadError, NotFittedError, UserInputError
from anomalyvfm.features.backbone import Backbone
from anomalyvfm.head.search import cpu_capabilities
from anomalyvfm.version import __version__

CALIBRATION_SAMPLES = 300  # NNCF's default subset size; crops beyond it add time, not accuracy


class FeatureGraph(nn.Module):
    """`(B, 3, H, W)` images in [0, 1] → `(B, h*w, C)` L2-normalised patch features of the kept blocks."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.patch_features((pixels - self.mean) / self.std)


def _graph_backbone(detector) -> Backbone:
    """The detector's backbone in fp32 on the CPU, with a LoRA adapter merged into a copy of its weights."""
    backbone = detector.pipeline.backbone
    model = backbone.model
    if detector.pipeline.adapter is not None:
        model = copy.deepcopy(detector.pipeline.adapter).merge_and_unload()
    return Backbone(copy.deepcopy(model).cpu().float(), backbone.layers, "fp32").eval()


def resolve_precision(precision: str, fmt: str, calibrated: bool) -> str:
    """`precision`, or for `AUTO` the fastest one that meets parity and can be written here (module doc)."""
    if precision != AUTO:
        return precision
    if fmt == "openvino" and "BF16" in cpu_capabilities():
        return "bf16"
    if calibrated and importlib.util.find_spec("nncf") is not None:
        return "int8"
    return "fp32"


def _check_exportable(detector, fmt: str, precision: str) -> None:
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown export precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if fmt == "onnx" and precision == "bf16":
        raise UserInputError("--precision bf16 needs --format openvino (ONNX Runtime has no bf16 CPU kernels for it)")
    if detector.pipeline.head is None:
        raise NotFittedError("cannot export an unfitted detector")


def _calibration(images: Sequence[ImageLike], settings, patch: int) -> list[np.ndarray]:
    """`(1, 3, h, w)` crops of every view of `images`, as the runtime will feed them, at most CALIBRATION_SAMPLES."""
    samples: list[np.ndarray] = []
    for image in images:
        try:
            rgb = load_rgb(image)
        except ImageReadError as exc:
            raise UserInputError(f"calibration image unreadable: {exc}") from None
        for size, tiling in settings.views():
            samples += [crop[None] for *_, crop in view_crops(rgb, size, tiling, patch)[1]]
        if len(samples) >= CALIBRATION_SAMPLES:
            break
    return samples[:CALIBRATION_SAMPLES]


def _write_openvino(graph: FeatureGraph, example: torch.Tensor, precision: str, calibration: list[np.ndarray],
                    path: Path) -> None:
    import openvino as ov

    model = ov.convert_model(graph, example_input=example, input=[ov.PartialShape([-1, 3, -1, -1])])
    if precision == "int8":
        import nncf

        model = nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration))
    ov.save_model(model, str(path), compress_to_fp16=False)


def _write_onnx(graph: FeatureGraph, example: torch.Tensor, precision: str, calibration: list[np.ndarray],
                path: Path) -> None:
    import onnx

    axes = {"pixels": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch", 1: "patches"}}
    torch.onnx.export(graph, (example,), str(path), input_names=["pixels"], output_names=["features"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)
    if precision == "int8":
        import nncf

        model = nncf.quantize(onnx.load(str(path)), nncf.Dataset(calibration, lambda x: {"pixels": x}),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
        onnx.save(model, str(path))


def export_model(model: str | Path, format: str = "openvino", precision: str = "fp32",
                 calibration_images: Sequence[ImageLike] = (), out: str | Path | None = None) -> tuple[Path, str]:
    """Add a backbone form (`format`-`precision`, see `bundle`) to the model directory `model`; with `out`,
    write a copy for a line PC instead: the model without its torch files (backbone weights, LoRA adapter and
    heads), plus the form. Return the directory written and the form's name.

    `calibration_images` (good images the model was fitted or validated on) are required for int8;
    `precision="auto"` picks one (`resolve_precision`). Only the backbone is converted: the head's arrays,
    settings and calibration stay as the model has them. Written atomically (`model_dir.write`).
    """
    from anomalyvfm.detector.detector import AnomalyDetector

    precision = resolve_precision(precision, format, bool(calibration_images))
    stored = model_dir.read(model)
    detector = AnomalyDetector.from_stored(stored, device="cpu")
    _check_exportable(detector, format, precision)
    target = Path(out) if out is not None else stored.directory
    if out is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserInputError(f"{target}: already exists; export to a new folder")
    backbone = _graph_backbone(detector)
    calibration = _calibration(calibration_images, detector.settings, backbone.patch_size) if precision == "int8" else []
    if precision == "int8" and not calibration:
        raise UserInputError("--precision int8 needs calibration images: the model's train or validation good images")
    side = detector.settings.image_size // backbone.patch_size * backbone.patch_size
    example = torch.from_numpy(calibration[0]) if calibration else torch.rand(1, 3, side, side)
    form = form_name(format, precision)

    def write_graph(folder: Path) -> None:
        (folder / form).mkdir()
        with torch.inference_mode(False), torch.no_grad():
            writer = _write_openvino if format == "openvino" else _write_onnx
            writer(FeatureGraph(backbone).eval(), example, precision, calibration, folder / form / GRAPH_FILES[format][0])

    description = {"format": format, "precision": precision, "exported_with": __version__,
                   "calibration_samples": len(calibration),
                   "backbone": {"patch_size": backbone.patch_size, "hidden_size": backbone.hidden_size,
                                "layers": list(backbone.layers), "feature_dim": backbone.feature_dim}}
    torch_files = (model_dir.BACKBONE_DIR, model_dir.ADAPTER_DIR, model_dir.HEADS_FILE) if out is not None else ()
    updated = replace(stored, forms={**stored.forms, form: description})
    if target.exists() and out is not None:
        target.rmdir()  # an empty folder the user made for it
    model_dir.write(target, updated, write_graph, copy_from=stored.directory, leave_out=(form, *torch_files))
    return target, form
