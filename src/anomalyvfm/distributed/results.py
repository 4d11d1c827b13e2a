"""The output folder of a Ray predict: results that survive a kill, resume, and belong to one model.

    OUT/predictions.parquet/part-*.parquet   results in committed parts (a Parquet dataset: pandas,
                                             pyarrow, Spark and Ray read the folder as one table)
    OUT/predictions.csv                      the same rows in the local engine's CSV format, rebuilt
                                             from the parts at the end of every run
    OUT/model.json                           which model (sha256 of its config.json, which holds the
                                             checksum of every model file) and score mode wrote them

A part is written to a hidden temporary file and renamed into place, so a killed job leaves only whole
parts; a restarted job skips every path already in a part (nothing scored twice) and scores the rest
(nothing lost). At most one unflushed part — `FLUSH_ROWS` rows or `FLUSH_SECONDS` of work — is redone.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from anomalyvfm.errors import UserInputError
from anomalyvfm.outputs import PREDICTIONS_CSV, PredictionsCsv, output_errors, write_atomic, write_text

PARTS_DIR = "predictions.parquet"
CSV_FILE = PREDICTIONS_CSV
IDENTITY_FILE = "model.json"
FLUSH_ROWS = 4096
FLUSH_SECONDS = 10.0


def schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("score", pa.float64()), ("is_anomalous", pa.bool_()),
                      ("error", pa.string())])


def model_identity(model: Path, score_mode: str) -> dict[str, str]:
    """What makes two runs' predictions comparable: the exact model files and the score mode judged in."""
    config = model / "config.json"
    try:
        digest = hashlib.sha256(config.read_bytes()).hexdigest()
    except OSError as exc:
        raise UserInputError(f"{config}: cannot read the model ({exc.strerror or exc})") from None
    return {"config_sha256": digest, "score": score_mode, "model": str(model.absolute())}


class ResultStore:
    """Append-only results of one model in `out`; `done` holds the paths already committed."""

    def __init__(self, out: Path, identity: dict[str, str], resume: bool, overwrite: bool) -> None:
        self.out, self.parts = out, out / PARTS_DIR
        self._claim(identity, resume, overwrite)
        self.done: set[str] = self._committed_paths()
        self._buffer: list[Any] = []
        self._pending: set[str] = set()  # paths buffered, not yet committed
        self._rows = 0
        self._last_flush = time.monotonic()

    def _claim(self, identity: dict[str, str], resume: bool, overwrite: bool) -> None:
        """Refuse a folder holding another model's results (unless `overwrite`); start afresh if not `resume`."""
        record = self.out / IDENTITY_FILE
        if record.exists():
            try:
                previous = json.loads(record.read_text())
            except (OSError, ValueError) as exc:
                raise UserInputError(f"{record}: unreadable ({exc}); use --overwrite to start afresh") from None
            same = {k: previous.get(k) for k in ("config_sha256", "score")} == \
                   {k: identity[k] for k in ("config_sha256", "score")}
        else:
            same = not (self.parts.exists() or (self.out / CSV_FILE).exists())  # results of an unknown model?
        if not same and not overwrite:
            what = (f"model {previous.get('model')} (score {previous.get('score')})" if record.exists()
                    else "a model it did not record")
            raise UserInputError(f"{self.out}: holds predictions of {what}, not of this model; "
                                 "use --overwrite to replace them, or another --out")
        if not same or not resume:
            shutil.rmtree(self.parts, ignore_errors=True)
            (self.out / CSV_FILE).unlink(missing_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        with output_errors(record):
            write_atomic(record, lambda tmp: write_text(tmp, json.dumps(identity, indent=2) + "\n"))

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def _committed_paths(self) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for part in self._part_files():
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        return done

    def add(self, batch: Any) -> None:
        """Buffer a `pyarrow.Table` of results; commit a part when enough rows or time have gathered.

        Rows of paths already held (committed or buffered) are dropped: a retried batch can never
        put a path in the output twice, whatever the engine redelivers.
        """
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        fresh = [p not in self.done and p not in self._pending for p in paths]
        if not all(fresh):
            batch = batch.filter(pa.array(fresh))
        self._pending.update(batch.column("path").to_pylist())
        self._buffer.append(batch)
        self._rows += batch.num_rows
        if self._rows >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._rows:
            table = pa.concat_tables(self._buffer).cast(schema())
            with output_errors(self.parts, lambda: f"{len(self.done)} results are committed in it; run again to resume"):
                write_atomic(self.parts / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet",
                              lambda tmp: pq.write_table(table, tmp))
            self.done.update(self._pending)
        self._buffer, self._pending, self._rows, self._last_flush = [], set(), 0, time.monotonic()

    def write_csv(self) -> tuple[int, int]:
        """Rebuild predictions.csv from every part (one part in memory at a time); return (rows, errors)."""
        import pyarrow.parquet as pq

        rows = errors = 0

        def write(tmp: Path) -> None:
            nonlocal rows, errors
            with PredictionsCsv(tmp, shown_as=self.out / CSV_FILE) as table:
                for part in self._part_files():
                    for path, score, anomalous, error in zip(*pq.read_table(part).to_pydict().values()):
                        rows += 1
                        errors += error is not None
                        table.add(path, score, anomalous, error)

        write_atomic(self.out / CSV_FILE, write)  # a failed rebuild leaves the previous CSV, and all the parts
        return rows, errors
