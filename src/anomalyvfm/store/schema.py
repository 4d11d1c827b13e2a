"""The inspection store's tables (SQLAlchemy Core), as the newest migration leaves them.

One row per scored image, written once (its `id` is the primary key, so replaying a record that already
arrived changes nothing), and later given the operator's label. Times are UTC. The migrations under
`migrations/versions/` create and change these tables; `SCHEMA_VERSION` is the newest one's revision,
and a test checks that the migrated database matches this module.
"""
from __future__ import annotations

from sqlalchemy import Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text

SCHEMA_VERSION = "0001"  # the newest migration's revision id (migrations/versions/)
LABELS = ("good", "defect")

metadata = MetaData()

inspections = Table(
    "inspections", metadata,
    Column("id", String(32), primary_key=True),  # uuid4 hex, made where the image was scored
    Column("time", DateTime(timezone=True), nullable=False),  # when the verdict was given (UTC)
    Column("source", Text, nullable=False),  # the uploaded file name, or the file path for `predict`
    Column("sha256", String(64), nullable=False),  # of the image's bytes as received
    Column("size_bytes", Integer, nullable=False),
    Column("station", String(255), nullable=False),  # host that scored it (several line PCs share one store)
    Column("model_name", Text, nullable=False),
    Column("model_version", String(64), nullable=False),  # StoredModel.version: what judged the image
    Column("score", Float, nullable=False),
    Column("image_threshold", Float, nullable=False),
    Column("pixel_threshold", Float, nullable=False),
    Column("is_anomalous", Boolean, nullable=False),
    Column("outlined_fraction", Float, nullable=True),  # share of the image's pixels inside the defect outline
    Column("request_id", String(64), nullable=True),  # the service's X-Request-ID, or the `predict` run's id
    Column("label", String(8), nullable=True),  # the operator's: good | defect (none until labelled)
    Column("label_by", String(255), nullable=True),
    Column("label_time", DateTime(timezone=True), nullable=True),
    Column("label_note", Text, nullable=True),
    Index("ix_inspections_time", "time"),
    Index("ix_inspections_sha256", "sha256"),
    Index("ix_inspections_model_version", "model_version"),
    Index("ix_inspections_label", "label"),
)
