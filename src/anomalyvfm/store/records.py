"""What the store holds: one `Inspection` per scored image, as rows, as JSON (API, spill file) and as the
`LabelledInspection` that `update` reads; and `Filters` of a history query."""
from __future__ import annotations

import socket
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from anomalyvfm.prediction import Prediction

STATION = socket.gethostname()


def utc(moment: datetime) -> datetime:
    """A database time as an aware UTC datetime (SQLite gives it back naive, PostgreSQL aware)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else utc(moment).isoformat().replace("+00:00", "Z")


@dataclass
class Inspection:
    """One verdict as it is recorded; `new` stamps the id, the time and this station."""

    id: str
    time: datetime
    source: str
    sha256: str
    size_bytes: int
    station: str
    model_name: str
    model_version: str
    score: float
    image_threshold: float
    pixel_threshold: float
    is_anomalous: bool
    outlined_fraction: float | None = None
    request_id: str | None = None

    @classmethod
    def new(cls, **values: Any) -> Inspection:
        return cls(id=uuid.uuid4().hex, time=datetime.now(timezone.utc), station=STATION, **values)

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "score": float(self.score), "is_anomalous": bool(self.is_anomalous)}

    def to_json(self) -> dict[str, Any]:
        return {**self.row(), "time": iso(self.time)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Inspection:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        return cls(**{**values, "time": datetime.fromisoformat(values["time"].replace("Z", "+00:00"))})


def verdict_record(predictor: Any, model_name: str, source: str, digest: str, size: int, pred: Prediction,
                   request_id: str | None) -> Inspection:
    """The record of one verdict: the image, the model that judged it, the thresholds in force, the outline."""
    thresholds = predictor.thresholds()
    mask = pred.mask
    return Inspection.new(source=source, sha256=digest, size_bytes=size, model_name=model_name,
                          model_version=getattr(predictor, "version", ""), score=float(pred.score),
                          image_threshold=float(thresholds.image_threshold),
                          pixel_threshold=float(thresholds.pixel_threshold), is_anomalous=bool(pred.is_anomalous),
                          outlined_fraction=None if mask is None else float(np.count_nonzero(mask)) / max(mask.size, 1),
                          request_id=request_id)


def public(row: Any) -> dict[str, Any]:
    """A stored row as the API and the export show it: every column, times in ISO 8601 UTC."""
    record = dict(row._mapping)
    return {**record, "time": iso(record["time"]), "label_time": iso(record["label_time"])}


@dataclass
class LabelledInspection:
    """An inspection an operator labelled, with its kept image (`None` when images are not kept or it was
    never kept): what `anomalyvfm update` learns from."""

    id: str
    source: str
    sha256: str
    score: float
    is_anomalous: bool
    model_version: str
    label: str
    image_path: Path | None


@dataclass(frozen=True)
class Filters:
    """A history query: time range [since, until), verdict, label (`none`: not labelled yet), model version."""

    since: datetime | None = None
    until: datetime | None = None
    verdict: Literal["anomalous", "normal"] | None = None
    label: Literal["good", "defect", "none"] | None = None
    model_version: str | None = None
