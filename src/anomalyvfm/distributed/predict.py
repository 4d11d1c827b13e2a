"""Batch predict on Ray: Ray Data streams the image paths to a pool of actors, the driver commits results.

Each actor loads the model once (`AnomalyDetector.load`) and scores one batch of paths per call with
`predict_iter`, so an unreadable image is an error row like in the local engine. Ray Data restarts an
actor that dies and retries the block it held (up to `TASK_RETRIES` times); the driver is the only
writer, receives a batch's rows only when the batch finished, and drops any path it already holds,
so every path lands in the output exactly once. Pictures are written by the actors, into `OUT` (on a
cluster that must be a folder every node mounts), under names the driver gives each path with
`outputs.output_names` (the local engine's names), which travel with the paths; a resumed run keeps
the names already in `OUT` for the images it scored before.

`HOLD_ENV` is a test hook: it lets a test kill an actor that provably holds a batch (see `hold_batch`).
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from anomalyvfm.distributed.cluster import check_model_everywhere, ray_session, worker_count
from anomalyvfm.distributed.results import ResultStore, model_identity, schema
from anomalyvfm.distributed.sources import expand_sources
from anomalyvfm.errors import UserInputError
from anomalyvfm.outputs import PICTURE_SUFFIXES, output_names, prepare_output_folder

BATCHES_PER_BLOCK = 4  # a block is the unit redone after a worker dies: a few batches
SHOWN_ERRORS = 10  # unreadable images named on stderr; all of them are in the output
TASK_RETRIES = 3  # a block that kills its worker this often fails the job (resumable), never loops forever
HOLD_ENV = "ANOMALYVFM_TEST_HOLD_BATCHES"  # test hook: a folder where actors mark and hold the batches they start


@dataclass
class PredictRun:
    """What one run did, for the summary line and the benchmark."""

    inputs: int
    skipped: int  # already in OUT from an earlier run
    scored: int
    errors: int  # error rows in the whole output
    total_rows: int
    workers: int
    seconds: float



def hold_batch() -> None:
    """Test hook: if `HOLD_ENV` names an existing folder, mark that this process started a batch (a file
    named by its pid), then wait while the folder exists without a `release` file in it.

    A test then kills the marked process knowing it is inside a batch, rather than guessing from process
    titles within a time limit (which failed on a busy machine). Unset, as outside tests, it costs one
    environment lookup per batch.
    """
    folder = os.environ.get(HOLD_ENV)
    if not folder or not os.path.isdir(folder):
        return
    with open(os.path.join(folder, f"{os.getpid()}.started"), "a") as marker:
        marker.write("batch\n")
    while os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "release")):
        time.sleep(0.02)


class ScoringActor:
    """One Ray Data actor: loads the model once, then scores a `pyarrow.Table` of paths per call."""

    def __init__(self, model: str, runtime: dict[str, Any], pictures: str | None) -> None:
        from anomalyvfm.detector.detector import AnomalyDetector
        from anomalyvfm.maps.render import display_range

        self.detector = AnomalyDetector.load(model, **runtime)
        self.pictures = Path(pictures) if pictures else None
        t = self.detector.thresholds()
        self.value_range = display_range(t.validation_stats["pixel_score_mean"], t.pixel_threshold)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from anomalyvfm.maps.render import save_pictures

        paths, names = batch.column("path").to_pylist(), batch.column("name").to_pylist()
        hold_batch()
        rows: dict[str, list] = {"path": paths, "score": [], "is_anomalous": [], "error": []}
        for name, pred in zip(names, self.detector.predict_iter(paths, progress=None, decide=True)):
            rows["score"].append(None if pred.error else float(pred.score))
            rows["is_anomalous"].append(None if pred.error else bool(pred.is_anomalous))
            rows["error"].append(pred.error)
            if self.pictures is not None and not pred.error:
                save_pictures(self.pictures, name, pred, self.value_range)
        return pa.Table.from_pydict(rows, schema=schema())


def predict_on_ray(model: str | Path, sources: Sequence[str], out: str | Path, runtime: dict[str, Any],
                   address: str | None = None, workers: int | None = None, pictures: bool = False,
                   resume: bool = True, overwrite: bool = False,
                   on_batch: Callable[[int], None] | None = None) -> PredictRun:
    """Score every image of `sources` with the model at `model` on Ray; results in `out` (see `results`).

    `on_batch(rows)` is called as each scored batch reaches the driver (progress, benchmarks).
    """
    model = Path(model).absolute()
    paths = expand_sources(sources)
    check_storable(paths)
    out = prepare_output_folder(out, paths, model)  # before a cluster is started, like every check here
    model_identity(model, "")  # an unreadable model fails here, before a cluster is started
    start = time.perf_counter()
    with ray_session(address, workers) as ray:
        gpus = 1.0 if str(runtime.get("device") or "cpu").startswith("cuda") else 0.0
        workers = worker_count(ray, workers, gpus)
        mode = check_model_everywhere(ray, model, runtime)
        store = ResultStore(out, model_identity(model, mode), resume, overwrite)
        todo = [p for p in paths if p not in store.done]
        names = output_names(todo, taken=existing_names(out) if store.done else ())
        shown = 0
        try:
            for batch in _scored_batches(ray, todo, names, model, runtime, workers, gpus, out if pictures else None):
                store.add(batch)
                if on_batch:
                    on_batch(batch.num_rows)
                for error in batch.column("error").drop_null().to_pylist()[:SHOWN_ERRORS - shown]:
                    print(f"anomalyvfm: skipped {error}", file=sys.stderr)
                    shown += 1
        except ray.exceptions.RayError as exc:  # a block failed on every retry (e.g. each attempt killed a worker)
            store.flush()
            raise UserInputError(f"the Ray job failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
                                 f"{len(store.done)} results are kept in {out}: run again to resume") from None
        store.flush()
    rows, errors = store.write_csv()
    return PredictRun(len(paths), len(paths) - len(todo), len(todo), errors, rows, workers,
                      time.perf_counter() - start)


def map_on_actors(ray: Any, blocks: list, actor: type, args: tuple, batch_size: int, workers: int, gpus: float) -> Any:
    """`blocks` mapped batch by batch on `workers` actors of class `actor` (one CPU or GPU each), a block
    retried at most `TASK_RETRIES` times."""
    with warnings.catch_warnings():  # Ray 2.60 deprecates `max_task_retries` here but offers no replacement yet
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.data.from_arrow(blocks).map_batches(
            actor, fn_constructor_args=args, batch_size=batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus,
            max_task_retries=TASK_RETRIES)


def blocks_of(paths: list[str], batch_size: int, workers: int) -> Iterator[tuple[int, list[str]]]:
    """(start, paths) blocks: a few batches each, but enough blocks to keep every worker busy."""
    rows = max(batch_size, min(batch_size * BATCHES_PER_BLOCK, math.ceil(len(paths) / (4 * workers))))
    for start in range(0, len(paths), rows):
        yield start, paths[start:start + rows]


def check_storable(paths: Sequence[str]) -> None:
    """Refuse, before a cluster starts, a path the results cannot hold: Parquet strings are UTF-8, and a
    Linux file name need not be (the local engine writes such names losslessly, `outputs`)."""
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise UserInputError(f"{path.encode('utf-8', 'backslashreplace').decode()}: a file name that is not "
                                 "UTF-8 cannot be stored in predictions.parquet; score it with --engine local "
                                 "or rename it") from None


def existing_names(out: Path) -> list[str]:
    """Output names whose pictures are already in `out` (from earlier runs into it)."""
    return [entry.name[: -len(suffix)] for entry in out.iterdir() for suffix in PICTURE_SUFFIXES
            if entry.name.endswith(suffix)]


def _scored_batches(ray: Any, paths: list[str], names: list[str], model: Path, runtime: dict[str, Any], workers: int,
                    gpus: float, pictures: Path | None):
    """Result tables as batches finish (in no particular order), from `workers` actors."""
    import pyarrow as pa

    if not paths:
        return
    batch_size = int(runtime.get("batch_size") or 8)
    blocks = [pa.table({"path": chunk, "name": names[start:start + len(chunk)]})
              for start, chunk in blocks_of(paths, batch_size, workers)]
    dataset = map_on_actors(ray, blocks, ScoringActor, (str(model), runtime, str(pictures) if pictures else None),
                            batch_size, workers, gpus)
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")

