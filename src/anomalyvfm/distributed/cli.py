"""The `--engine ray` options of `fit` and `predict`, and the commands' Ray branches.

Kept here so that `cli/main.py` only adds the options and hands over when `--engine ray` is given.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from anomalyvfm.errors import UserInputError

ENGINES = ("local", "ray")


def add_engine_options(parser: argparse.ArgumentParser, predict: bool = False) -> None:
    """`--engine` and the options of the Ray engine (for `predict` also `--resume` and `--overwrite`)."""
    group = parser.add_argument_group("scale-out on Ray (pip install 'anomalyvfm[ray]')")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: this process (default); ray: a pool of Ray workers, each loading the model once")
    group.add_argument("--address", help="Ray cluster to join: HOST:PORT of its head, ray://HOST:PORT or auto "
                                         "(default: start Ray on this machine)")
    group.add_argument("--workers", type=int, help="Ray workers, one CPU (or GPU with --device cuda) each "
                                                   "(default: one per CPU of the cluster)")
    if predict:
        group.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                           help="skip images already in --out from an earlier run of the same model (default: on)")
        group.add_argument("--overwrite", action="store_true",
                           help="replace results in --out written by a different model")


def check_local(args: argparse.Namespace) -> None:
    """Ray-only options given without `--engine ray` are a mistake, not silently ignored."""
    given = [flag for flag, value in (("--address", args.address), ("--workers", args.workers),
                                      ("--overwrite", getattr(args, "overwrite", False)),
                                      ("--no-resume", getattr(args, "resume", True) is False)) if value]
    if given:
        raise UserInputError(f"{', '.join(given)} only apply with --engine ray")


def fit_on_ray(args: argparse.Namespace, variant):
    """`fit --engine ray`: the local fit with training features extracted on Ray workers."""
    from anomalyvfm.distributed.cluster import ray_session, worker_count
    from anomalyvfm.distributed.fit import ray_detector
    from anomalyvfm.detector.fit import fit_category

    with ray_session(args.address, args.workers) as ray:
        workers = worker_count(ray, args.workers, 1.0 if variant.runtime.device.startswith("cuda") else 0.0)
        return fit_category(args.data, args.category, args.layout, variant, ray_detector(ray, workers))


def predict_on_ray_command(args: argparse.Namespace, runtime: dict) -> int:
    """`predict --engine ray`: exit 0, or 1 if some images were unreadable (error rows), like the local engine."""
    from anomalyvfm.distributed.predict import predict_on_ray

    run = predict_on_ray(args.model, args.paths, args.out, runtime, args.address, args.workers,
                         pictures=bool(args.images), resume=args.resume, overwrite=args.overwrite)
    out = Path(args.out)
    print(f"scored {run.scored} images on {run.workers} Ray workers in {run.seconds:.1f}s"
          + (f", skipped {run.skipped} already in {out}" if run.skipped else "")
          + f" → {out / 'predictions.parquet'} and predictions.csv ({run.total_rows} rows"
          + (f", {run.errors} unreadable)" if run.errors else ")"))
    return 1 if run.errors else 0


@contextmanager
def engine_detector(args: argparse.Namespace, detector: Any, runtime: dict[str, Any]) -> Iterator[Any]:
    """For `evaluate` / `export-submission`: the detector itself (`--engine local`), or, for the duration of
    the command, one whose `predict_iter` runs on Ray workers (`RayDetector`)."""
    if args.engine != "ray":
        check_local(args)
        yield detector
        return
    from anomalyvfm.distributed.cluster import check_model_everywhere, ray_session, worker_count
    from anomalyvfm.distributed.remote_detector import RayDetector

    gpus = 1.0 if str(runtime.get("device") or "cpu").startswith("cuda") else 0.0
    with ray_session(args.address, args.workers) as ray:
        workers = worker_count(ray, args.workers, gpus)
        model = str(Path(args.model).absolute())
        check_model_everywhere(ray, Path(model), runtime)
        yield RayDetector(detector, model, runtime, ray, workers, gpus)
