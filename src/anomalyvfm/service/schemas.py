"""Request and response bodies of the HTTP service, as documented in `/openapi.json`."""
from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model

from anomalyvfm.declare import declared
from anomalyvfm.detector.settings import Runtime, Settings

MapPNG = Annotated[str | None, Field(description="with ?maps=true: base64 PNG (jet) at the image's size; blue is "
                                                 "the validation mean, red twice the pixel threshold's distance above")]
MaskPNG = Annotated[str | None, Field(description="with ?maps=true: base64 PNG, 255 where the pixel score is above "
                                                  "the pixel threshold, else 0")]


class PredictResponse(BaseModel):
    score: float = Field(description="image anomaly score: mean of the highest top_percent % patch scores")
    is_anomalous: bool = Field(description="score > threshold")
    threshold: float = Field(description="the model's image threshold (validation mean + threshold_sigma std)")
    model: str = Field(description="model directory name")
    model_version: str = Field("", description="content identity of the model that judged the image (changes with "
                                               "anomalyvfm update or calibrate; picked up by POST /admin/reload)")
    elapsed_ms: float = Field(description="server time for the request: upload, decode, queue, inference, maps")
    anomaly_map_png: MapPNG = None
    mask_png: MaskPNG = None


class BatchItem(BaseModel):
    filename: str
    status: int = Field(description="200, or the status /predict would have answered for this file alone")
    score: float | None = None
    is_anomalous: bool | None = None
    error: str | None = Field(None, description="why this file was not scored")
    anomaly_map_png: MapPNG = None
    mask_png: MaskPNG = None


class BatchResponse(BaseModel):
    model: str
    threshold: float
    results: list[BatchItem] = Field(description="one per uploaded file, in upload order")
    elapsed_ms: float


def declared_fields(cls: type) -> dict[str, Any]:
    """Pydantic field definitions of a settings dataclass, described by its declarations' help texts."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], Field(description=spec.help.replace("%%", "%"))) for f, spec in declared(cls)}


ModelInfo = create_model(
    "ModelInfo",
    __doc__="The model card: every setting and runtime option (as declared), its thresholds and provenance.",
    model=(str, Field(description="model directory name")),
    **declared_fields(Settings),
    **declared_fields(Runtime),
    image_threshold=(float, ...),
    pixel_threshold=(float, ...),
    validation_stats=(dict[str, int | float], ...),
    threshold_evidence=(dict[str, str], Field(default_factory=dict, description="per level (image, pixel): how the "
                        "threshold was read off the normal scores, and, for false-alarm budgets, the validation false "
                        "alarms observed against the predicted rate with their 95 % interval")),
    train_images=(int, Field(description="training images the model was fitted on")),
    fitted_at=(str, Field(description="when the model was fitted (ISO 8601, UTC; empty for older models)")),
    fitted_with_version=(str, Field(description="anomalyvfm version that fitted the model")),
    package_version=(str, Field(description="anomalyvfm version serving it")),
    limits=(dict[str, Any], Field(description="the server's limits and timeouts (docs/serving.md)")),
    store=(str | None, Field(None, description="the inspection store every verdict is recorded in (serve --store; "
                                               "password hidden), or null")),
    model_version=(str, Field("", description="content identity of what decides a verdict (settings, calibration, "
                                            "head arrays); every stored record names it")),
    updates=(list[dict[str, Any]], Field(default_factory=list, description="anomalyvfm update lineage, oldest first: "
                                         "parent version, images added, labels used, thresholds before and after")),
    calibration_defects=(dict[str, Any], Field(default_factory=dict, description="labelled defects the thresholds were "
                                               "also set from (fit --calibration-defects): folder, images, F1 on them; "
                                               "empty for a normal-only model")),
    defects=(dict[str, Any], Field(default_factory=dict, description="labelled real defects learnt as evidence (fit "
                                   "--defects): source, images, defect patches per view, the weight and how it was "
                                   "chosen; empty for a model without")),
    image_evidence_choice=(dict[str, Any], Field(default_factory=dict, description="how the fit chose the image "
                                                 "evidence (--image-evidence auto or --auto): the rule, each evidence's "
                                                 "validation AUROC on synthetic anomalies, the choice; empty if given")),
)
DECLARED_NAMES = {f.name for cls in (Settings, Runtime) for f, _ in declared(cls)}


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    model_loaded: bool
    worker_alive: bool
    queue_depth: int
    queue_capacity: int
    store: Literal["ok", "degraded"] | None = Field(None, description="with --store: degraded while records go to "
                                                                     "the spill file (verdicts are unaffected)")
    records_waiting: int | None = Field(None, description="with --store: records in the spill file waiting for the store")
    last_error: str | None = Field(None, description="with --store: why the store is degraded")


class ReloadRequest(BaseModel):
    model: str | None = Field(None, description="model directory to serve from now on (default: the one served, "
                                                "re-read: e.g. replaced by anomalyvfm update --out on the same path)")


class ReloadResponse(BaseModel):
    model: str
    model_version: str = Field(description="the version judging from now on")
    previous_version: str


class ErrorResponse(BaseModel):
    detail: str
