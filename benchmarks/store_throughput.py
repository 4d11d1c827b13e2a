"""Service throughput with and without the inspection store, side by side on this machine.

    python benchmarks/store_throughput.py --model M --images DIR --postgres postgresql://postgres@127.0.0.1:5432/bench

Each round starts `anomalyvfm serve` three times — no store, a new SQLite file (`--store`), the PostgreSQL
URL — and loads each with the same requests (`serve_load.run_load`: --threads client threads, one
connection each, after a warm-up of one request per thread). The configurations alternate within every
round, so a machine whose load drifts (a shared one) biases none of them; the table gives each round's
images/s and the median ratio to no store. Every answered verdict is also counted in the store afterwards.

`--record-cost N` instead writes N records one at a time through a `Recorder` (one transaction each, the
worst case: no group commit) and prints the CPU and wall time per record, SQLite and PostgreSQL.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import run_load, start_server, wait_healthy  # noqa: E402

from anomalyvfm.data import list_images  # noqa: E402
from anomalyvfm.store import Inspection, Recorder, open_store  # noqa: E402


def measure(args: argparse.Namespace, store: str | None, images: list[tuple[str, bytes]]) -> tuple[float, int]:
    """(images/s of answered requests, records in the store afterwards: -1 without a store)."""
    with tempfile.TemporaryFile() as log:
        process, url = start_server(argparse.Namespace(**{**vars(args), "store": store}), log)
        try:
            wait_healthy(url, process, timeout=300)
            run_load(url, images, args.threads, args.threads, {}, False, time.monotonic() + 120)
            start = time.perf_counter()
            results = run_load(url, images, args.requests, args.threads, {}, False, time.monotonic() + 600)
            wall = time.perf_counter() - start
        finally:
            process.terminate()
            process.wait(60)
    ok = sum(1 for _, status, _ in results if status == 200)
    if ok != len(results):
        raise RuntimeError(f"{len(results) - ok} requests failed")
    records = -1
    if store:
        opened = open_store(store, keep_images=None)
        records = opened.find()[1]
        opened.close()
    return ok / wall, records


def record_cost(url: str, count: int) -> str:
    """CPU and wall milliseconds per record written alone (the caller waits for each commit)."""
    store = open_store(url, keep_images=None)
    recorder = Recorder(store)
    records = [Inspection.new(source=f"part_{i}.png", sha256="0" * 64, size_bytes=1, model_name="m", model_version="v",
                              score=1.0, image_threshold=1.0, pixel_threshold=1.0, is_anomalous=False,
                              outlined_fraction=0.0, request_id=str(i)) for i in range(count + 10)]
    for record in records[:10]:  # warm-up: connections, statements
        recorder.record(record)
    cpu, wall = time.process_time(), time.perf_counter()
    for record in records[10:]:
        recorder.record(record)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    recorder.close()
    store.close()
    return f"{1000 * cpu / count:.2f} ms CPU, {1000 * wall / count:.2f} ms wall per record"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help="folder of images to post, round-robin")
    parser.add_argument("--postgres", help="PostgreSQL URL of an empty database (left out if not given)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--record-cost", type=int, metavar="N", help="only measure N records written one at a time")
    args = parser.parse_args()
    if args.record_cost:
        with tempfile.TemporaryDirectory() as folder:
            for name, url in (("sqlite", str(Path(folder) / "cost.db")), ("postgresql", args.postgres)):
                if url:
                    print(f"{name}: {record_cost(url, args.record_cost)}")
        return 0
    images = [(path.name, path.read_bytes()) for path in list_images(args.images)]
    rates: dict[str, list[float]] = {"none": [], "sqlite": [], "postgresql": []}
    expected = {"sqlite": 0, "postgresql": 0}
    with tempfile.TemporaryDirectory() as folder:
        stores = {"none": None, "sqlite": str(Path(folder) / "bench.db"), "postgresql": args.postgres}
        for round_ in range(args.rounds):
            for name, store in stores.items():
                if name != "none" and store is None:
                    continue
                rate, records = measure(args, store, images)
                rates[name].append(rate)
                if store:
                    expected[name] += args.requests + args.threads
                    assert records == expected[name], f"{name}: {records} records, {expected[name]} answered"
                print(f"round {round_ + 1} {name:10s} {rate:7.2f} images/s" + (f"  ({records} records)" if store else ""),
                      flush=True)
    base = statistics.median(rates["none"])
    print("\n| store | images/s per round | median | ratio to no store |\n|---|---|---|---|")
    for name, values in rates.items():
        if values:
            median = statistics.median(values)
            print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {median:.2f} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
