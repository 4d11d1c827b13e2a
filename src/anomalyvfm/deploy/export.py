"""Export a fitted `AnomalyDetector` to an inference bundle (format: `bundle`), runnable without torch.

* The graph is the backbone's `patch_features` with ImageNet normalisation in front: dynamic batch,
  height and width, so one graph serves every image shape and every view (short sides, tiles).
* The scorer stays outside the graph, as arrays (`scorer.npz`), chosen by measuring on magnetic_tile
  (ViT-S/14, 448 px, 9280-entry bank): the kNN product in the backbone graph would run at the graph's
  precision, and bf16 similarities (≈ 0.9–1.0, 3 significant digits) are too coarse for distances of
  ~0.05–0.3. Instead the runtime searches the bank in its own small OpenVINO graph — a bf16 shortlist
  re-ranked exactly in fp32 (`runtime.BankSearch`): 2x faster than numpy's fp32 product (0.49 → 0.24 s
  per image under load), distances within 2e-6 relative. Mahalanobis is one 768x768 product: numpy.
* A LoRA-adapted backbone is exported with the adapter merged into its weights (peft `merge_and_unload`
  on a copy), so the bundle needs neither peft nor the adapter files; head/fusion score modes need the
  torch heads and are refused.
* `bf16` is the fp32 graph compiled with OpenVINO's bf16 inference precision (AMX/AVX-512 BF16 CPUs);
  `int8` is NNCF post-training quantisation calibrated on the images given (the model's own train or
  validation good images — never test images). `auto` (the CLI default) takes the fastest precision that
  met the parity bounds on real data among those possible here (docs/deploy.md, magnetic_tile, side by
  side: OpenVINO bf16 5.1×, int8 4.0×, fp32 1.7× torch fp32 end to end; the backbone alone 322 ms bf16
  against 394 ms int8 — AMX runs bf16 matrix products faster than NNCF's int8 graph with its
  (de)quantisation steps): bf16 for OpenVINO on a CPU with bf16 units, else int8 when NNCF is installed
  and calibration images are given (int8 units are far more common than bf16 ones), else fp32.
* The bundle is written to a temporary sibling folder and renamed into place: an interrupted or failed
  export leaves nothing at `out`.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from anomalyvfm.data.images import ImageLike, load_rgb
from anomalyvfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomalyvfm.deploy.bundle import AUTO, FORMAT_VERSION, FORMATS, GRAPH_FILES, MANIFEST, PRECISIONS, SCORER, sha256
from anomalyvfm.declare import to_dict
from anomalyvfm.deploy.runtime import view_crops
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


def _settings(detector) -> dict:
    """Everything the runtime needs, JSON-ready: the settings, the runtime options, the thresholds and
    statistics of the exported score mode, and the fit record (for the model card)."""
    c, t = detector.calibration, detector.thresholds()
    return json.loads(json.dumps({
        **to_dict(detector.settings), **to_dict(detector.runtime), "score": detector.score_mode,
        "image_threshold": t.image_threshold, "pixel_threshold": t.pixel_threshold,
        "validation_stats": t.validation_stats, "evidence": t.evidence, "normal_samples": t.normal_samples, "view_stats": c.view_stats, "foreground_stats": c.foreground,
        "image_stats": c.image_stats,
        "train_images": detector.record.train_images, "fitted_at": detector.record.fitted_at,
        "version": detector.record.package_version}))


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
    if detector.score_mode != "distance":
        raise UserInputError(f"cannot export score mode '{detector.score_mode}': the LoRA heads are not exported; "
                             "export with --score distance")


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


def export_bundle(detector, out: str | Path, format: str = "openvino", precision: str = "fp32",
                  calibration_images: Sequence[ImageLike] = ()) -> Path:
    """Write `detector` as an inference bundle at `out` (see `bundle`); return `out`.

    `calibration_images` (good images the model was fitted or validated on) are required for int8;
    `precision="auto"` picks one (`resolve_precision`); the manifest records the one written.
    """
    precision = resolve_precision(precision, format, bool(calibration_images))
    _check_exportable(detector, format, precision)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out}: already exists; export to a new folder")
    backbone = _graph_backbone(detector)
    calibration = _calibration(calibration_images, detector.settings, backbone.patch_size) if precision == "int8" else []
    if precision == "int8" and not calibration:
        raise UserInputError("--precision int8 needs calibration images: the model's train or validation good images")
    side = detector.settings.image_size // backbone.patch_size * backbone.patch_size
    example = torch.from_numpy(calibration[0]) if calibration else torch.rand(1, 3, side, side)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        graph_path = tmp / GRAPH_FILES[format][0]
        with torch.inference_mode(False), torch.no_grad():
            writer = _write_openvino if format == "openvino" else _write_onnx
            writer(FeatureGraph(backbone).eval(), example, precision, calibration, graph_path)
        np.savez(tmp / SCORER, **detector.pipeline.head.state_dict())
        manifest = {
            "format_version": FORMAT_VERSION, "format": format, "precision": precision,
            "exported_with": __version__, "calibration_samples": len(calibration),
            "backbone": {"patch_size": backbone.patch_size, "hidden_size": backbone.hidden_size,
                         "layers": list(backbone.layers), "feature_dim": backbone.feature_dim},
            "config": _settings(detector),
            "files": {p.name: sha256(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # an empty folder the user made for it
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

