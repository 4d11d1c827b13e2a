"""One entry point for every command that scores images: a model directory (any form) or an earlier bundle.

`Runtime.backend` (`--runtime`) picks what runs the backbone: `torch` (the model's `backbone/` weights),
`openvino` or `onnx` (an exported form in the model directory), or `auto`: on a GPU device torch, else the
fastest form present that this machine runs (`bundle.FORM_PREFERENCE`: its engine installed, its precision
supported by this CPU), else torch. Everything after the backbone is the same `ScoringHead` whichever runs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from anomalyvfm.deploy.bundle import CPU_NEEDS, FORM_PREFERENCE, is_bundle, read_bundle
from anomalyvfm.detector import model_dir
from anomalyvfm.detector.model_dir import StoredModel
from anomalyvfm.errors import UserInputError
from anomalyvfm.prediction import Predictor

ENGINE_MODULES = {"openvino": "openvino", "onnx": "onnxruntime"}


def runnable(form: str) -> bool:
    """Whether this machine has the engine for `form` and, for OpenVINO, the CPU units its precision needs."""
    engine, precision = form.split("-")
    if importlib.util.find_spec(ENGINE_MODULES[engine]) is None:
        return False
    if engine == "openvino" and precision in CPU_NEEDS:
        from anomalyvfm.head.search import cpu_capabilities

        return CPU_NEEDS[precision] in cpu_capabilities()
    return True


def choose_form(stored: StoredModel, backend: str, device: str, mode: str) -> str | None:
    """The form to run (a folder name), or None for the torch backbone; see the module docstring. A score
    `mode` other than distance needs the LoRA heads, which only torch runs."""
    present = [form for form in FORM_PREFERENCE if form in stored.forms]
    if backend == "torch" or (backend == "auto" and (device != "cpu" or mode != "distance")):
        return None
    if backend == "auto":
        return next((form for form in present if runnable(form)), None)
    mine = [form for form in present if form.startswith(backend + "-")]
    if not mine:
        raise UserInputError(f"{stored.directory}: has no {backend} form (it has: {', '.join(present) or 'none'}); "
                             f"add one with: anomalyvfm export --model {stored.directory} --format {backend}")
    return next((form for form in mine if runnable(form)), mine[0])  # an unrunnable one fails in one line later


def load_predictor(path: str | Path, backbone: str | Path | None = None, **runtime: Any) -> Predictor:
    """A predictor for a model directory or an earlier bundle; `runtime` holds the `Runtime` options.

    A graph form needs no torch (nothing imports it); `backbone` locates the weights of a model saved by
    reference when torch runs it.
    """
    backend = runtime.get("backend") or "auto"
    if is_bundle(path):
        from anomalyvfm.deploy.runtime import GraphPredictor

        stored, form = read_bundle(path)
        return GraphPredictor(stored, Path(path), form, **runtime)
    stored = model_dir.read(path)
    mode = runtime.get("score") or stored.calibration.mode
    form = choose_form(stored, backend, runtime.get("device") or "cpu", mode)
    if form is not None:
        from anomalyvfm.deploy.runtime import GraphPredictor

        return GraphPredictor(stored, stored.directory / form, stored.forms[form], **runtime)
    from anomalyvfm.detector.detector import AnomalyDetector

    return AnomalyDetector.from_stored(stored, backbone, **runtime)
