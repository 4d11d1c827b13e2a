"""Joining or starting Ray, with every failure a user can cause turned into one `UserInputError` line.

Ray on its own waits a long time for an unreachable head and reports a model directory that only the
driver can read as an actor crash deep in a traceback; both are checked here before any work starts.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from anomalyvfm.errors import UserInputError

CONNECT_TIMEOUT_S = 5.0


def import_ray() -> ModuleType:
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserInputError("--engine ray needs Ray: pip install 'anomalyvfm[ray]'") from None
    return ray


def check_reachable(address: str) -> None:
    """Fail in one line within `CONNECT_TIMEOUT_S` if the head at `host:port` does not accept connections."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise UserInputError(f"--address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserInputError(f"--address {address}: cannot reach a Ray cluster there ({exc.strerror or exc})") from None


@contextmanager
def ray_session(address: str | None, workers: int | None) -> Iterator[ModuleType]:
    """Ray connected to `address` (or a new one-machine cluster), shut down after if this call started it.

    An already initialised Ray (a notebook, the tests) is used as it is.
    """
    ray = import_ray()
    if address:
        check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address:
        options["address"] = address
    else:  # a one-machine cluster on the loopback, its workers importing the same anomalyvfm as this process
        options.update(num_cpus=max(os.cpu_count() or 1, workers or 1), _node_ip_address="127.0.0.1",
                       runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [
                           str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))}})
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserInputError(f"--address {address}: cannot join the Ray cluster ({str(exc).splitlines()[0]})") from None
    quiet_ray_data(ray)
    try:
        yield ray
    finally:
        ray.shutdown()


def quiet_ray_data(ray: ModuleType) -> None:
    """No progress bars or per-run log lines from Ray Data: the CLI prints its own one-line summary."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def worker_count(ray: ModuleType, workers: int | None, gpus: float) -> int:
    """`--workers`, checked against the cluster's CPUs (GPUs), or one per CPU (GPU) by default."""
    resources = ray.cluster_resources()
    available = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 0))
    if workers is None:
        return max(1, available)
    if workers < 1:
        raise UserInputError(f"--workers must be at least 1, got {workers}")
    if workers > available:
        raise UserInputError(f"--workers {workers}: the Ray cluster has room for {available} "
                             f"({'GPUs' if gpus else 'CPUs'}: {resources.get('GPU' if gpus else 'CPU', 0):g})")
    return workers


def on_every_node(ray: ModuleType, function: Any, *args: Any) -> list[Any]:
    """Run `function(*args)` once on each alive node (zero CPUs: it never waits behind the actors)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(function)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    try:
        return ray.get([remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(*args)
                        for n in nodes])
    except ray.exceptions.RayError as exc:  # e.g. anomalyvfm not installed on a node
        cause = getattr(exc, "cause", None) or exc
        raise UserInputError(f"the Ray workers cannot run anomalyvfm: {type(cause).__name__}: "
                             f"{str(cause).strip().splitlines()[-1]}") from None


def check_model_everywhere(ray: ModuleType, model: Path, runtime: dict[str, Any]) -> str:
    """Load the model once on every node, as the actors will; return its score mode.

    A directory the driver reads but a worker node does not (a path local to the driver, missing
    permissions, a damaged file) then fails in one line naming the node, not as an actor crash.
    """
    results = on_every_node(ray, _try_load, str(model), runtime)
    for node, mode, error in results:
        if error:
            raise UserInputError(f"{model}: cannot be loaded on Ray node {node}: {error}")
    return results[0][1]


def _try_load(model: str, runtime: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(node address, score mode, None) if the model loads here, else (node address, None, the error line)."""
    from anomalyvfm.detector.detector import AnomalyDetector

    node = socket.gethostname()
    try:
        return node, AnomalyDetector.load(model, **runtime).score_mode, None
    except Exception as exc:  # any reason a worker cannot use the model is reported, in one line
        return node, None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
