"""The first inspection store schema: the `inspections` table and its indexes.

Revision ID: 0001
Revises:
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("station", sa.String(255), nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("image_threshold", sa.Float, nullable=False),
        sa.Column("pixel_threshold", sa.Float, nullable=False),
        sa.Column("is_anomalous", sa.Boolean, nullable=False),
        sa.Column("outlined_fraction", sa.Float, nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("label_by", sa.String(255), nullable=True),
        sa.Column("label_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("label_note", sa.Text, nullable=True),
    )
    for column in ("time", "sha256", "model_version", "label"):
        op.create_index(f"ix_inspections_{column}", "inspections", [column])


def downgrade() -> None:
    op.drop_table("inspections")
