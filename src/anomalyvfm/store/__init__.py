"""The inspection store: every scored image's record (SQLite or PostgreSQL), operator labels, kept images.

`open_store(url)` connects and migrates; `Recorder` writes records from a front end without ever failing
its verdicts (spilling while the store is down); `labelled()` is what `anomalyvfm update` learns from.
docs/line.md describes the loop from a plant's point of view.

The names below are imported on first use, so commands that never touch a store (and their parsers,
which name its options) do not pay for importing SQLAlchemy and Alembic.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"open_store": "inspections", "InspectionStore": "inspections", "UnknownInspection": "inspections",
          "Recorder": "recorder", "Filters": "records", "Inspection": "records", "LabelledInspection": "records",
          "verdict_record": "records", "DEFAULT": "images"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'anomalyvfm.store' has no attribute {name!r}")
    return getattr(importlib.import_module(f"anomalyvfm.store.{_HOMES[name]}"), name)
