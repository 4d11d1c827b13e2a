"""`Recorder`: records go to the store from one writer thread, and to the spill file when the store fails.

A verdict is answered only once its record is in the store or in the fsync'd spill file (`record` returns
then), so an answered verdict is never lost, and a store that fails never fails the verdict.

* **Group commit.** Records submitted while the writer is busy become its next transaction: under load,
  one commit (one fsync) covers many verdicts, so the store costs the service little throughput.
* **Degraded.** When a write fails, that batch goes to the spill file and the store is *degraded*: later
  records go straight to the spill file (in order, and without waiting for a server that does not answer),
  and a second thread replays the file (every `retry_s` seconds while the store still fails, at once
  again after a replay that wrote) until it is empty — then records go to the store again. `status()` says which, and how many records wait (`/health/ready`, `/metrics`).
* **Last resort.** If the spill file cannot be written either (a full disk), the record is lost: that is
  logged and counted (`lost`), and the verdict is still answered — the line never stops for its records.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any

import sqlalchemy as sa

from anomalyvfm.store.database import reason
from anomalyvfm.store.inspections import InspectionStore
from anomalyvfm.store.records import Inspection
from anomalyvfm.store.spill import Spill

log = logging.getLogger("anomalyvfm.error")
MAX_BATCH = 256
STORED, SPILLED, LOST = "stored", "spilled", "lost"


class Recorder:
    """Writes records to `store`, spilling to `spill` while it fails (module doc)."""

    def __init__(self, store: InspectionStore, spill: Spill | None = None, retry_s: float = 1.0) -> None:
        self.store, self.retry_s = store, retry_s
        self.spill = spill or Spill(store.spill_path)
        self.counts = {STORED: 0, SPILLED: 0, LOST: 0, "replayed": 0}
        self.last_error = ""
        self._jobs: queue.Queue[tuple[Inspection, Future[str]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads = [threading.Thread(target=self._write_loop, name="anomalyvfm-store-writer", daemon=True),
                         threading.Thread(target=self._replay_loop, name="anomalyvfm-store-replay", daemon=True)]
        self.replay()  # records left by an earlier run go first
        self._wake.set()  # (and if they could not, the replay thread retries them)
        for thread in self._threads:
            thread.start()

    # -- callers -----------------------------------------------------------------------------------
    def submit(self, record: Inspection) -> Future[str]:
        """Queue a record; the future's result says where it went (`stored`, `spilled`, `lost`)."""
        future: Future[str] = Future()
        self._jobs.put((record, future))
        return future

    def record(self, record: Inspection) -> str:
        return self.submit(record).result()

    @property
    def degraded(self) -> bool:
        return self.spill.waiting > 0

    def status(self) -> dict[str, Any]:
        return {"store": "degraded" if self.degraded else "ok", "records_waiting": self.spill.waiting,
                "last_error": self.last_error if self.degraded else ""}

    def close(self) -> None:
        """Write what is queued, try once more to replay the spill file, and stop the threads."""
        self._stop.set()
        self._jobs.put(None)
        self._wake.set()
        for thread in self._threads:
            thread.join()
        self.replay()

    # -- the writer thread -------------------------------------------------------------------------
    def _next_batch(self) -> list[tuple[Inspection, Future[str]]] | None:
        job = self._jobs.get()
        batch = [] if job is None else [job]
        while len(batch) < MAX_BATCH:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                batch.append(job)
        return batch if batch or not self._stop.is_set() else None

    def _write_loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                try:
                    outcome = self._write([record for record, _ in batch])
                except Exception as exc:  # noqa: BLE001 — a bug here must not leave a verdict waiting forever
                    log.error(f"{len(batch)} inspection records lost ({type(exc).__name__}: {exc})",
                              exc_info=exc, extra={"fields": {"event": "records_lost"}})
                    self.counts[LOST] += len(batch)
                    outcome = LOST
                for _, future in batch:
                    future.set_result(outcome)

    def _write(self, records: list[Inspection]) -> str:
        if not self.degraded:
            try:
                self.store.add(records)
                self.counts[STORED] += len(records)
                return STORED
            except sa.exc.SQLAlchemyError as exc:  # any database failure: the batch waits in the spill file
                self._failed(exc)
        try:
            self.spill.append([record.to_json() for record in records])
        except OSError as exc:
            log.error(f"{len(records)} inspection records lost: the store and the spill file {self.spill.path} "
                      f"both failed ({exc.strerror or exc})", extra={"fields": {"event": "records_lost"}})
            self.counts[LOST] += len(records)
            return LOST
        self.counts[SPILLED] += len(records)
        self._wake.set()
        return SPILLED

    def _failed(self, exc: BaseException) -> None:
        self.last_error = reason(exc)
        log.warning(f"store {self.store.name} failed ({self.last_error}): records go to {self.spill.path} until "
                    "it is back", extra={"fields": {"event": "store_degraded"}})

    # -- the replay thread -------------------------------------------------------------------------
    def _replay_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()  # before the check: a spill after it wakes the next round
            while self.degraded and not self._stop.is_set():
                # after a replay that wrote, at once again (what came meanwhile), so that under steady
                # load the backlog shrinks to nothing and records go to the store directly again
                if not self.replay() and self._stop.wait(self.retry_s):
                    break

    def replay(self) -> int:
        """Write the spill file's records to the store, in order; return how many went (0 if it still fails)."""
        if not self.spill.waiting:
            return 0
        try:
            done = self.spill.replay(lambda rows: self.store.add(Inspection.from_json(row) for row in rows))
        except sa.exc.SQLAlchemyError as exc:
            self.last_error = reason(exc)
            return 0
        self.counts["replayed"] += done
        log.info(f"store {self.store.name} is back: {done} spilled records written",
                 extra={"fields": {"event": "store_recovered", "records": done}})
        return done
