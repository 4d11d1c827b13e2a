"""Throughput of `predict` on the local engine vs Ray with 1 and 2 workers, on the same images, in one run.

    python benchmarks/ray_scaling.py --model MODEL --images DIR [DIR ...] --limit 60 --batch-size 8

Each engine runs twice, on `--small` and on `--limit` evenly spaced images, each run in its own
subprocess (so each peak RSS is its own): the local engine (`AnomalyDetector.load` + `predict_iter`,
with torch's default threads and with 1 thread), then `predict_on_ray` on a fresh one-machine Ray cluster
(2 CPUs, 127.0.0.1) with 1 and 2 workers. Per engine it reports the wall time (model load / Ray start
included), the time to the first result, the steady rate (images after the first batch / time after it),
the driver's peak RSS and each Ray worker's peak RSS (sampled every 0.2 s), and the machine's load
average (the CPUs may be shared with other work: say so next to the figures).
The line through the two wall times gives each engine's fixed cost (start, model load) and its
marginal cost per image; results reach the driver in bunches, so the arrival-based "steady" rate is
shown but not used. Ray's overhead per image is the difference of marginal costs, Ray with 1 worker
vs the local engine limited to 1 thread (a Ray worker with 1 CPU runs torch on 1 thread).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENGINES = ("local", "local-1thread", "ray-1", "ray-2")


def image_paths(folders: list[str], limit: int) -> list[str]:
    """`limit` evenly spaced images from the sorted images of all folders (same list for every engine)."""
    from anomalyvfm.data import evenly_spaced, list_images

    files = sorted(str(p.absolute()) for folder in folders for p in list_images(folder))
    return [str(p) for p in evenly_spaced(files, limit)]


class WorkerMemory:
    """Peak RSS of each Ray scoring actor process (descendants of this process), sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.peaks, self.system_peak = psutil, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            for process in self.psutil.Process().children(recursive=True):
                try:
                    rss, title = process.memory_info().rss, " ".join(process.cmdline()).strip()
                except self.psutil.Error:
                    continue
                total += rss
                if "ScoringActor" in title:
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
            self.system_peak = max(self.system_peak, total)
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mb = [round(v / 2**20) for v in self.peaks.values()]
        return {"worker_peak_rss_mb": max(mb, default=0), "workers_seen": len(mb),
                "all_ray_processes_peak_rss_mb": round(self.system_peak / 2**20)}


def run_one(engine: str, model: str, paths: list[str], batch_size: int) -> dict:
    """Score `paths` with one engine in this process; timings, rates and memory as a dict."""
    from anomalyvfm.evaluation.evaluate import peak_rss_mb

    arrivals: list[tuple[float, int]] = []
    start = time.perf_counter()
    result: dict = {"engine": engine, "images": len(paths)}
    if engine.startswith("local"):
        import torch

        from anomalyvfm.detector.detector import AnomalyDetector

        if engine == "local-1thread":  # what one Ray worker gets (Ray sets OMP_NUM_THREADS to its 1 CPU)
            torch.set_num_threads(1)

        detector = AnomalyDetector.load(model, batch_size=batch_size)
        for pred in detector.predict_iter(paths, progress=None):
            assert pred.error is None, pred.error
            arrivals.append((time.perf_counter(), 1))
        result["torch_threads"] = torch.get_num_threads()
    else:
        import ray

        from anomalyvfm.distributed.cluster import quiet_ray_data
        from anomalyvfm.distributed.predict import predict_on_ray

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 object_store_memory=512 * 2**20)
        quiet_ray_data(ray)
        result["ray_start_s"] = round(time.perf_counter() - start, 2)
        memory = WorkerMemory()
        with tempfile.TemporaryDirectory() as out:
            run = predict_on_ray(model, paths, out, {"batch_size": batch_size}, workers=int(engine.split("-")[1]),
                                 on_batch=lambda rows: arrivals.append((time.perf_counter(), rows)))
        assert run.scored == len(paths) and run.errors == 0, run
        result.update(memory.stop())
        ray.shutdown()
    end = arrivals[-1][0]
    done = 0  # the steady rate starts after the first `batch_size` images (load and warm-up excluded)
    for first, (t_first, rows) in enumerate(arrivals):
        done += rows
        if done >= batch_size:
            break
    after = len(paths) - done
    result.update(wall_s=round(end - start, 2), first_result_s=round(arrivals[0][0] - start, 2),
                  images_per_s_wall=round(len(paths) / (end - start), 3),
                  images_per_s_steady=round(after / (end - t_first), 3) if end > t_first else None,
                  driver_peak_rss_mb=round(peak_rss_mb()))  # VmHWM: its own peak, not its launcher's
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", nargs="+", required=True, help="folders of images")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--small", type=int, default=8, help="images of the short run (fixed cost)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--one", choices=ENGINES, help=argparse.SUPPRESS)  # a child process: one engine
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    paths = image_paths(args.images, args.limit)
    if args.one:
        print(json.dumps(run_one(args.one, args.model, paths, args.batch_size)))
        return
    rows = []
    for engine in ENGINES:
        runs = {}
        for n in (args.small, args.limit):  # two sizes: fixed cost and cost per image from a line through both
            load = os.getloadavg()[0]
            child = subprocess.run([sys.executable, __file__, "--one", engine, "--model", args.model, "--images",
                                    *args.images, "--limit", str(n), "--batch-size", str(args.batch_size)],
                                   capture_output=True, text=True, timeout=1800)
            if child.returncode:
                sys.exit(f"{engine} failed:\n{child.stderr[-3000:]}")
            runs[n] = json.loads(child.stdout.strip().splitlines()[-1])
            runs[n]["load_avg_1min_before"] = round(load, 1)
            print(json.dumps(runs[n]), flush=True)
        row = runs[args.limit]
        per_image = (row["wall_s"] - runs[args.small]["wall_s"]) / (args.limit - args.small)
        row.update(marginal_images_per_s=round(1 / per_image, 3), marginal_s_per_image=round(per_image, 3),
                   fixed_s=round(runs[args.small]["wall_s"] - args.small * per_image, 1),
                   load_avg=f"{runs[args.small]['load_avg_1min_before']}/{row['load_avg_1min_before']}")
        rows.append(row)
    local, single = rows[0]["marginal_s_per_image"], rows[1]["marginal_s_per_image"]
    for row in rows[1:]:
        row["speedup_vs_local"] = round(local / row["marginal_s_per_image"], 2)
    # Ray's own cost per image: one worker vs the same single-threaded model in one process
    rows[2]["overhead_ms_per_image"] = round(1000 * (rows[2]["marginal_s_per_image"] - single))
    keys = ["engine", "images", "wall_s", "fixed_s", "marginal_images_per_s", "speedup_vs_local",
            "overhead_ms_per_image", "images_per_s_steady", "driver_peak_rss_mb", "worker_peak_rss_mb", "all_ray_processes_peak_rss_mb",
            "load_avg"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
