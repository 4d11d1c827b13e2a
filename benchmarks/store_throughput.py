"""Service throughput with and without the inspection store, side by side on this machine.

    python benchmarks/store_throughput.py --model M --images DIR --postgres postgresql://postgres@127.0.0.1:5432/bench

Three `anomalyvfm serve` processes start and warm up — no store, a new SQLite file (`--store`), the
PostgreSQL URL — and then, round after round, each gets one burst of the same requests
(`serve_load.run_load`: --threads client threads, one connection each) while the others idle. Short
interleaved bursts on warm servers (the order reversed every other round) spread a shared machine's drifting
load over all three; the table gives each round's images/s and the median ratio to no store. The records in
each store are counted at the end (one per answered verdict, warm-up included).

`--record-cost N` instead writes N records one at a time through a `Recorder` (one transaction each, the
worst case: no group commit) and prints the CPU and wall time per record, SQLite and PostgreSQL.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import run_load, start_server, wait_healthy  # noqa: E402

from anomalyvfm.data import list_images  # noqa: E402
from anomalyvfm.store import Inspection, Recorder, open_store  # noqa: E402


def burst(url: str, args: argparse.Namespace, images: list[tuple[str, bytes]]) -> float:
    """Images/s of one burst of --requests requests from --threads clients (every one must be answered)."""
    start = time.perf_counter()
    results = run_load(url, images, args.requests, args.threads, {}, False, time.monotonic() + 600)
    wall = time.perf_counter() - start
    failed = sum(1 for _, status, _ in results if status != 200)
    if failed or len(results) != args.requests:
        raise RuntimeError(f"{failed} of {len(results)} requests failed")
    return len(results) / wall


def count_records(store: str) -> int:
    opened = open_store(store, keep_images=None)
    try:
        return opened.find()[1]
    finally:
        opened.close()


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
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        stores = {"none": None, "sqlite": str(Path(folder) / "bench.db"), "postgresql": args.postgres}
        stores = {name: store for name, store in stores.items() if name == "none" or store}
        servers = {}
        for name, store in stores.items():  # all warm at once; only the one under load works
            log = stack.enter_context(tempfile.TemporaryFile())
            process, url = start_server(argparse.Namespace(**{**vars(args), "store": store}), log)
            stack.callback(process.wait, 60)
            stack.callback(process.terminate)
            wait_healthy(url, process, timeout=300)
            run_load(url, images, args.threads, args.threads, {}, False, time.monotonic() + 120)  # warm-up
            servers[name] = url
        rates: dict[str, list[float]] = {name: [] for name in stores}
        for round_ in range(args.rounds):
            order = list(stores) if round_ % 2 == 0 else list(stores)[::-1]  # no configuration always first
            for name in order:
                rates[name].append(burst(servers[name], args, images))
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n][-1]:.2f}" for n in stores) + " images/s", flush=True)
        for name, store in stores.items():
            if store:
                answered = args.rounds * args.requests + args.threads
                print(f"{name}: {count_records(store)} records for {answered} answered verdicts (a fresh store)")
    base = statistics.median(rates["none"])
    print("\n| store | images/s per round | median | ratio to no store |\n|---|---|---|---|")
    for name, values in rates.items():
        if values:
            median = statistics.median(values)
            print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {median:.2f} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
