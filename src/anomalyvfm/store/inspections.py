"""`InspectionStore`: the store's reads and writes — records added once, history queries, labels — and
`open_store`, the one way in."""
from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from anomalyvfm.errors import UserInputError
from anomalyvfm.store.database import connect, engine_url, shown
from anomalyvfm.store.images import DEFAULT, DEFAULT_MAX_BYTES, ImageKeeper
from anomalyvfm.store.records import Filters, Inspection, LabelledInspection, public, utc
from anomalyvfm.store.schema import LABELS, SCHEMA_VERSION, inspections

MAX_PAGE = 1000


class UnknownInspection(UserInputError):
    """A label or a lookup for an id the store does not hold (404 on the API)."""


class InspectionStore:
    """A migrated store and, when images are kept, its `ImageKeeper`."""

    def __init__(self, engine: Engine, url: str, images: ImageKeeper | None, spill_path: Path) -> None:
        self.engine, self.url, self.images, self.spill_path = engine, url, images, spill_path
        self.schema_version = SCHEMA_VERSION
        insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[engine.dialect.name]
        self._insert = insert(inspections).on_conflict_do_nothing(index_elements=["id"])

    @property
    def name(self) -> str:
        return shown(self.url)

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -----------------------------------------------------------------------------------
    def keep(self, data: bytes) -> str:
        """The SHA-256 of an image's bytes, kept in the image folder when there is one."""
        return self.images.keep(data) if self.images else hashlib.sha256(data).hexdigest()

    def add(self, records: Iterable[Inspection]) -> None:
        """Insert records in one transaction; one whose id is already there is left as it is (a replay)."""
        rows = [record.row() for record in records]
        if rows:
            with self.engine.begin() as connection:
                connection.execute(self._insert, rows)

    def set_label(self, inspection_id: str, label: str, note: str | None = None, by: str | None = None) -> dict[str, Any]:
        """Label one inspection good or defect (a later label replaces it); return the updated record."""
        if label not in LABELS:
            raise UserInputError(f"label must be 'good' or 'defect', got {label!r}")
        values = {"label": label, "label_note": note, "label_by": by or "", "label_time": datetime.now(timezone.utc)}
        with self.engine.begin() as connection:
            done = connection.execute(inspections.update().where(inspections.c.id == inspection_id).values(values))
            if done.rowcount == 0:
                raise UnknownInspection(f"no inspection with id {inspection_id!r} in {self.name}")
        return self.get(inspection_id)

    # -- reading -----------------------------------------------------------------------------------
    def get(self, inspection_id: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(inspections).where(inspections.c.id == inspection_id)).first()
        if row is None:
            raise UnknownInspection(f"no inspection with id {inspection_id!r} in {self.name}")
        return public(row)

    def find(self, filters: Filters = Filters(), limit: int = 100, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """A page of records matching `filters`, newest first, and how many match in all."""
        where = _conditions(filters)
        query = sa.select(inspections).where(*where).order_by(inspections.c.time.desc(), inspections.c.id)
        with self.engine.connect() as connection:
            total = connection.execute(sa.select(sa.func.count()).select_from(inspections).where(*where)).scalar_one()
            rows = connection.execute(query.limit(min(limit, MAX_PAGE)).offset(offset)).all()
        return [public(row) for row in rows], total

    def rows(self, filters: Filters = Filters()) -> Iterable[dict[str, Any]]:
        """Every matching record, oldest first, streamed (an export of millions of rows)."""
        query = sa.select(inspections).where(*_conditions(filters)).order_by(inspections.c.time, inspections.c.id)
        with self.engine.connect() as connection:
            for row in connection.execution_options(yield_per=1000).execute(query):
                yield public(row)

    def labelled(self, label: str) -> list[LabelledInspection]:
        """Every inspection labelled `label` ("good" or "defect"), oldest first, with its kept image."""
        if label not in LABELS:
            raise UserInputError(f"label must be 'good' or 'defect', got {label!r}")
        found = []
        for record in self.rows(Filters(label=label)):  # type: ignore[arg-type]
            path = self.images.path(record["sha256"]) if self.images else None
            found.append(LabelledInspection(record["id"], record["source"], record["sha256"], record["score"],
                                            record["is_anomalous"], record["model_version"], label, path))
        return found

    def labelled_hashes(self) -> set[str]:
        """Digests of every labelled image: the kept images the size cap must never delete."""
        query = sa.select(inspections.c.sha256).where(inspections.c.label.is_not(None)).distinct()
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())


def _conditions(f: Filters) -> list[Any]:
    c = inspections.c
    found = []
    if f.since is not None:
        found.append(c.time >= utc(f.since))
    if f.until is not None:
        found.append(c.time < utc(f.until))
    if f.verdict is not None:
        found.append(c.is_anomalous == (f.verdict == "anomalous"))
    if f.label == "none":
        found.append(c.label.is_(None))
    elif f.label is not None:
        found.append(c.label == f.label)
    if f.model_version is not None:
        found.append(c.model_version == f.model_version)
    return found


def open_store(url: str, keep_images: str | Path | None = DEFAULT, max_image_bytes: int = DEFAULT_MAX_BYTES,
               spill: str | Path | None = None, create: bool = True) -> InspectionStore:
    """Connect to (and migrate) the store at `url`; `UserInputError` in one line if it cannot be used.

    `keep_images`: a folder for the images, `"none"`/None for none, or `DEFAULT`: `<name>-images/` beside a
    SQLite file, none for PostgreSQL (a folder on one line PC would not be the shared store's; give one all
    PCs mount). `spill`: the file records wait in while the store is down (default: `<file>.spill.jsonl`
    beside a SQLite file; for a server, one per store under `$XDG_STATE_HOME/anomalyvfm/`). Commands that
    only read a store pass `create=False`: a mistyped path is then an error, not a new empty store.
    """
    target = engine_url(str(url))
    sqlite_file = Path(target.database) if target.drivername == "sqlite" else None
    engine = connect(str(url), create)
    folder: Path | None = None
    if keep_images == DEFAULT:
        folder = sqlite_file.with_name(sqlite_file.stem + "-images") if sqlite_file else None
    elif keep_images is not None and str(keep_images).lower() != "none":
        folder = Path(keep_images)
    store = InspectionStore(engine, str(url), None, Path(spill) if spill else default_spill(str(url), sqlite_file))
    try:
        if folder is not None:
            store.images = ImageKeeper(folder, max_image_bytes, store.labelled_hashes)
    except UserInputError:
        store.close()
        raise
    return store


def default_spill(url: str, sqlite_file: Path | None) -> Path:
    if sqlite_file is not None:
        return sqlite_file.with_name(sqlite_file.name + ".spill.jsonl")
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "anomalyvfm"
    return state / f"spill-{hashlib.sha256(shown(url).encode()).hexdigest()[:12]}.jsonl"
