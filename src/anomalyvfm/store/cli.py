"""The store's command-line options (`--store`, `--keep-images`, `--keep-images-max-gb`) and
`anomalyvfm history`, the export of the records to CSV or Parquet."""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from anomalyvfm.errors import UserInputError
from anomalyvfm.optional import require
from anomalyvfm.outputs import current_umask, open_text, output_errors
from anomalyvfm.store.images import DEFAULT
from anomalyvfm.store.records import Filters, verdict_record

if TYPE_CHECKING:  # SQLAlchemy and Alembic are imported by the commands that open a store (package doc)
    from anomalyvfm.store.inspections import InspectionStore
    from anomalyvfm.store.recorder import Recorder

STORE_HELP = ("inspection store: a SQLite file (results.db) or a postgresql://user@host/db URL; every scored image is "
              "recorded there (docs/line.md)")
EXPORT_SUFFIXES = (".csv", ".parquet")


def add_store_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_argument_group("inspection store")
    group.add_argument("--store", required=required, metavar="URL", help=STORE_HELP)
    if required:  # `history` reads the store; it keeps no images
        return
    group.add_argument("--keep-images", default=DEFAULT, metavar="DIR",
                       help="keep each recorded image here, by SHA-256 ('none': keep none; default: <store>-images/ "
                            "beside a SQLite file, none for PostgreSQL: give a folder every line PC mounts)")
    group.add_argument("--keep-images-max-gb", type=float, default=10.0, metavar="GB",
                       help="over this, the oldest unlabelled kept images are deleted; labelled ones never (default 10)")


def store_from_args(args: argparse.Namespace, create: bool | None = None) -> InspectionStore | None:
    """The store the options name, opened and migrated; None without `--store`. A command that only reads
    (`history`, `update`: `create=False`) refuses a store that does not exist instead of creating it."""
    if not getattr(args, "store", None):
        return None
    require("sqlalchemy", "store", "--store")
    require("alembic", "store", "--store")
    from anomalyvfm.store.inspections import open_store

    cap = getattr(args, "keep_images_max_gb", 10.0)
    if not cap > 0:
        raise UserInputError(f"--keep-images-max-gb must be positive, got {cap:g}")
    if create is None:
        create = hasattr(args, "keep_images")  # `history` has no image options: it only reads
    return open_store(args.store, getattr(args, "keep_images", None), int(cap * 2**30), create=create)


@contextmanager
def recording(store: InspectionStore | None) -> Iterator[Recorder | None]:
    """A `Recorder` for the block (None without a store); closed, and the store with it, at the end, saying
    how many records still wait in the spill file if the store was down."""
    if store is None:
        yield None
        return
    from anomalyvfm.store.recorder import Recorder

    recorder = Recorder(store)
    try:
        yield recorder
    finally:
        recorder.close()
        store.close()
        if recorder.spill.waiting:
            print(f"anomalyvfm: warning: {recorder.spill.waiting} records wait in {recorder.spill.path} for the "
                  f"store ({recorder.last_error}); the next command with --store {store.name} writes them",
                  file=sys.stderr)


def record_file(recorder: Recorder, predictor: Any, model: str | Path, pred: Any, run_id: str) -> None:
    """Record one `predict` verdict; the file is read again for its digest and kept copy."""
    try:
        data = Path(pred.source).read_bytes()
    except OSError as exc:
        print(f"anomalyvfm: warning: {pred.source}: not recorded, unreadable now ({exc.strerror or exc})",
              file=sys.stderr)
        return
    digest = recorder.store.keep(data)
    recorder.record(verdict_record(predictor, Path(model).resolve().name, pred.source, digest, len(data), pred, run_id))


def time_option(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None


def add_history_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=time_option, help="records from this time on (ISO 8601, UTC if no offset)")
    parser.add_argument("--until", type=time_option, help="records before this time")
    parser.add_argument("--verdict", choices=("anomalous", "normal"))
    parser.add_argument("--label", choices=("good", "defect", "none"), help="'none': not labelled yet")
    parser.add_argument("--model-version", help="records judged by this model version")


def export_history(store: InspectionStore, out: str | Path, filters: Filters = Filters()) -> int:
    """Write the matching records, oldest first, to `out` (.csv or .parquet) atomically; return how many."""
    from anomalyvfm.store.schema import inspections

    out = Path(out)
    if out.suffix.lower() not in EXPORT_SUFFIXES:
        raise UserInputError(f"--out {out}: name a .csv or .parquet file")
    if not out.parent.is_dir():
        raise UserInputError(f"--out {out}: folder {out.parent} does not exist")
    columns = [column.name for column in inspections.columns]
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        with output_errors(out, lambda: "nothing was written"):
            if out.suffix.lower() == ".parquet":
                count = _parquet(store, tmp, columns, filters)
            else:
                with open_text(tmp) as file:
                    writer = csv.DictWriter(file, columns)
                    writer.writeheader()
                    count = 0
                    for count, row in enumerate(store.rows(filters), 1):
                        writer.writerow(row)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is private
            os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return count


def _parquet(store: InspectionStore, path: str, columns: list[str], filters: Filters) -> int:
    pa = require("pyarrow", "ray", "--out FILE.parquet")
    import pyarrow.parquet as pq

    rows = list(store.rows(filters))
    table = pa.table({name: [row[name] for row in rows] for name in columns})
    pq.write_table(table, path)
    return len(rows)
