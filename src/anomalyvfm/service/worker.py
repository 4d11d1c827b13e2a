"""The single inference thread, its bounded queue, and per-job isolation.

Every torch call runs on one worker thread fed by a bounded queue. Images that arrive while it is busy
wait and are then scored together as one backbone batch (up to the model's `batch_size`), so the detector
is never called concurrently and a GPU still sees full batches under load.

Isolation: a job's failure answers only that job. `predict_iter` already turns one image's read or
processing failure into an error `Prediction`; should the batch itself raise (out of memory while
stacking, a bug), the jobs not yet answered are retried one by one, so the exception reaches only the job
that causes it alone. Backpressure: a full queue answers 503 at once rather than growing without bound,
and a job whose request deadline passes while it waits is dropped unscored.

Reload: `use(model)` swaps the model between batches. A batch takes the model once, when it starts, and
each answer names the model that judged it, so requests in flight finish on the old version and their
records say so.
"""
from __future__ import annotations

import asyncio
import queue
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fastapi import HTTPException

from anomalyvfm.prediction import Prediction

IN_MEMORY_NAME = re.compile(r"^<image \d+>: ")  # how extraction names an array; the request names its file itself
RETRY_AFTER = {"Retry-After": "1"}  # seconds; the queue drains a batch in well under that on a GPU


class JobFailed(Exception):
    """Scoring one image failed (out of memory, …): the message is the one-line reason."""


Judged = tuple[Prediction, Any]  # a prediction and the model (`app.Served`) that made it


@dataclass
class Job:
    image: np.ndarray | None
    maps: bool
    future: Future[Judged]


class InferenceWorker:
    """The thread that calls the detector; jobs queued while it works become its next batch."""

    def __init__(self, model: Any, max_queue: int, on_batch: Callable[[int], None] = lambda n: None,
                 keep_masks: bool = False) -> None:
        # `model.detector`: an AnomalyDetector or a GraphPredictor (both offer predict_iter and runtime)
        self.model = model
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_batch = on_batch
        self.keep_masks = keep_masks  # the inspection store records the outlined area of every image

    # -- lifecycle and state -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="anomalyvfm-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the batch in progress (for at most `timeout` s), then answer what is still queued with 503."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(HTTPException(503, "server is shutting down", headers=RETRY_AFTER))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def depth(self) -> int:
        return self._jobs.qsize()

    @property
    def full(self) -> bool:
        return self._jobs.full()

    def use(self, model: Any) -> None:
        """Judge with `model` from the next batch on (the batch in progress finishes on the one it took)."""
        self.model = model

    # -- request side (event loop) -----------------------------------------------------------------
    async def predict(self, image: np.ndarray, maps: bool, timeout: float) -> Judged:
        """Score `image` within `timeout` s, with the model that judged it; raise `HTTPException` 503,
        or `JobFailed` if it cannot be scored.

        The worker takes over the only reference to `image` and drops it once scored, so its memory is
        freed before the maps are encoded.
        """
        if not self.alive:
            raise HTTPException(503, "inference worker is not running", headers=RETRY_AFTER)
        future: Future[Judged] = Future()
        try:
            self._jobs.put_nowait(Job(image, maps, future))
        except queue.Full:
            raise HTTPException(503, f"inference queue is full ({self.max_queue} images waiting); retry shortly",
                                headers=RETRY_AFTER) from None
        del image
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(timeout, 0.001))
        except asyncio.TimeoutError:  # cancels the job if it has not started; a running one is discarded
            raise HTTPException(503, "request deadline passed before the image was scored (server busy); "
                                     "retry shortly", headers=RETRY_AFTER) from None

    # -- worker thread -----------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        """Wait for one job, then take whatever else is already waiting; None once asked to stop."""
        while True:
            if self._stopping.is_set():
                return None
            try:
                job = self._jobs.get(timeout=0.2)
                break
            except queue.Empty:
                continue
        batch = [job]
        while len(batch) < self.model.detector.runtime.batch_size:
            try:
                batch.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        # A job whose request gave up (deadline, client gone) was cancelled: skip it rather than score for nobody.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._on_batch(len(batch))
                self._score(batch)
            del batch

    def _score(self, batch: list[Job]) -> None:
        answered, model = 0, self.model  # taken once: a reload meanwhile applies to the next batch
        try:
            for job, pred in zip(batch, model.detector.predict_iter([job.image for job in batch], progress=None)):
                self._answer(job, pred, model)
                answered += 1
        except Exception as exc:  # noqa: BLE001 — any failure, MemoryError included, stays with its job
            rest = batch[answered:]
            if len(rest) == 1:
                rest[0].image = None
                rest[0].future.set_exception(JobFailed(f"processing failed ({type(exc).__name__}: {exc})"))
            else:
                for job in rest:
                    self._score([job])

    def _answer(self, job: Job, pred: Prediction, model: Any) -> None:
        job.image = None
        if pred.error:
            job.future.set_exception(JobFailed(IN_MEMORY_NAME.sub("", pred.error)))
            return
        if not job.maps:  # the full-size float map is the largest thing a prediction holds
            pred.anomaly_map = None
            pred.mask = pred.mask if self.keep_masks else None
        job.future.set_result((pred, model))

