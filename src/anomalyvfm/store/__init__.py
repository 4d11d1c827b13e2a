"""The inspection store: every scored image's record (SQLite or PostgreSQL), operator labels, kept images.

`open_store(url)` connects and migrates; `Recorder` writes records from a front end without ever failing
its verdicts (spilling while the store is down); `labelled()` is what `anomalyvfm update` learns from.
docs/line.md describes the loop from a plant's point of view.
"""
from anomalyvfm.store.inspections import DEFAULT, InspectionStore, UnknownInspection, open_store
from anomalyvfm.store.records import Filters, Inspection, LabelledInspection, verdict_record
from anomalyvfm.store.recorder import Recorder

__all__ = ["DEFAULT", "Filters", "Inspection", "InspectionStore", "LabelledInspection", "Recorder", "UnknownInspection",
           "open_store", "verdict_record"]
