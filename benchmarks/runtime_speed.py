"""End-to-end predict speed of a fitted model: torch fp32 / torch CPU-autocast bf16 / exported bundles.

Every variant scores the same images (decode → features → scores → map → verdict, no pictures written),
in its own subprocess so that peak RSS and thread pools are its own, one after the other in one run:

    PYTHONPATH=src python benchmarks/runtime_speed.py --model MODEL_DIR --data DATA --category CAT \
        [--images 40] [--bundle openvino-int8=DIR ...] [--out results.md]

Without `--bundle`, the model is exported to a temporary folder in each of openvino fp32/bf16/int8 and
onnx fp32 (int8 calibrated on the category's validation images). Reported per variant: images/s and the
ratio to torch fp32, the backbone-only share of the time (the graph alone on the same pre-processed
inputs), peak RSS, bundle size; for the exported variants also where the rest goes (decode, resize,
scoring, maps), each stage timed alone on the same images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(variant: str, model: str, images: list[str]) -> dict:
    """Time one variant in this process; return its figures."""
    from anomalyvfm.deploy.load import load_predictor
    from anomalyvfm.evaluation.evaluate import peak_rss_mb

    predictor = load_predictor(model, backend=variant.split("-")[0])  # a graph compiles in the warm-up call below
    autocast = contextlib.nullcontext()
    if variant == "torch-bf16":
        import torch

        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        list(predictor.predict_iter(images[:2], progress=None))  # warm-up: first-shape compilation, caches
        total = _timed(lambda: [p for p in predictor.predict_iter(images, progress=None)])
        stages = _stages(predictor, images)
    result = {"variant": variant, "images": len(images), "seconds": total, "images_per_s": len(images) / total,
              "peak_rss_mb": peak_rss_mb(), **stages}
    if not variant.startswith("torch"):
        result["bundle_mb"] = sum(p.stat().st_size for p in (Path(model) / variant).iterdir()) / 2**20
    return result


def _stages(predictor, images: list[str]) -> dict[str, float]:
    """Seconds of each stage alone on the same images: decode, resize, backbone, scoring, maps."""
    from anomalyvfm.data.images import load_rgb
    from anomalyvfm.maps.anomaly_maps import anomaly_map

    decoded = []
    decode = _timed(lambda: decoded.extend(load_rgb(p) for p in images))
    if hasattr(predictor, "form"):  # an exported backbone form
        from anomalyvfm.deploy.runtime import view_crops

        patch = predictor.load_engine().patch_size
        size, tiling = predictor.views[-1]
        prepared = []
        resize = _timed(lambda: prepared.extend(view_crops(rgb, size, tiling, patch) for rgb in decoded))
        grids = []
        backbone = _timed(lambda: grids.extend(predictor._features([p])[0] for p in prepared))
        scores = []
        view = len(predictor.views) - 1
        scoring = _timed(lambda: scores.extend(predictor.head.normal_scores(view, g).reshape(g.shape[:2]) for g in grids))
        shapes = [(p[0], rgb.shape[:2]) for p, rgb in zip(prepared, decoded)]
    else:  # torch detector: the backbone on the same pre-processed tensors
        import torch

        from anomalyvfm.data.transforms import to_tensor
        from anomalyvfm.features.tiles import view_size

        pipe = predictor.pipeline
        size, tiling = pipe.settings.views()[-1]
        patch = pipe.backbone.patch_size
        tensors = []
        resize = _timed(lambda: tensors.extend(to_tensor(rgb, view_size(*rgb.shape[:2], size, tiling, patch))
                                               for rgb in decoded))
        grids = []
        with torch.inference_mode():
            backbone = _timed(lambda: grids.extend(pipe.backbone(t[None])[0] for t in tensors))
        scores = []
        view = len(pipe.settings.views()) - 1
        scoring = _timed(lambda: scores.extend(pipe.head.normal_scores(view, g.numpy()).reshape(g.shape[:2]) for g in grids))
        shapes = [(tuple(t.shape[1:]), rgb.shape[:2]) for t, rgb in zip(tensors, decoded)]
    sigma = predictor.settings.sigma
    maps = _timed(lambda: [anomaly_map(s, p, i, sigma) for s, (p, i) in zip(scores, shapes)])
    return {"decode_s": decode, "resize_s": resize, "backbone_s": backbone, "scoring_s": scoring, "maps_s": maps}


VARIANTS = ("torch-fp32", "torch-bf16", "openvino-fp32", "openvino-bf16", "openvino-int8", "onnx-fp32", "onnx-int8")


def export_all(model: str, data: str, category: str | None, folder: Path, names: list[str]) -> dict[str, str]:
    """Export `model` to every bundle variant among `names` (`FORMAT-PRECISION`) under `folder`."""
    from anomalyvfm.data import load_dataset
    from anomalyvfm.deploy.export import export_model

    calibration = [s.path for s in load_dataset(data, category).split("validation")][:64]
    out = {}
    for name in names:
        fmt, precision = name.split("-")
        if fmt != "torch":
            out[name] = str(export_model(model, fmt, precision, calibration, folder / name)[0])
    return out


def table(rows: list[dict]) -> str:
    base = next(r["images_per_s"] for r in rows if r["variant"] == "torch-fp32")
    lines = ["| variant | images/s | × torch fp32 | backbone share | decode | resize | backbone | scoring | maps "
             "| peak RSS MB | bundle MB |", "|---" * 11 + "|"]
    for r in rows:
        per = {k: 1000 * r[f"{k}_s"] / r["images"] for k in ("decode", "resize", "backbone", "scoring", "maps")}
        lines.append(f"| {r['variant']} | {r['images_per_s']:.2f} | {r['images_per_s'] / base:.2f} | "
                     f"{r['backbone_s'] / r['seconds']:.0%} | " + " | ".join(f"{v:.0f} ms" for v in per.values())
                     + f" | {r['peak_rss_mb']:.0f} | {r.get('bundle_mb', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fitted model directory")
    parser.add_argument("--data", required=True)
    parser.add_argument("--category")
    parser.add_argument("--split", default="test_public")
    parser.add_argument("--images", type=int, default=40, help="images scored per variant (evenly spaced)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (torch-fp32 always runs: the base)")
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=DIR", help="reuse an exported bundle")
    parser.add_argument("--out", help="write the table (markdown) and raw figures (json) next to it")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    from anomalyvfm.data import evenly_spaced, load_dataset

    images = [str(s.path) for s in evenly_spaced(load_dataset(args.data, args.category).split(args.split), args.images)]
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], images)))
        return
    names = ["torch-fp32", *(v for v in args.variants.split(",") if v != "torch-fp32")]
    if unknown := set(names) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)} (choose from {', '.join(VARIANTS)})")
    with tempfile.TemporaryDirectory() as tmp:
        bundles = (dict(b.split("=", 1) for b in args.bundle)
                   or export_all(args.model, args.data, args.category, Path(tmp), names))
        variants = {**{n: args.model for n in names if n.startswith("torch")}, **bundles}
        load = os.getloadavg()[0]
        rows = []
        for name, model in variants.items():
            argv = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--split", args.split,
                    "--images", str(args.images), "--worker", name, model]
            if args.category:
                argv += ["--category", args.category]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {rows[-1]['images_per_s']:.2f} images/s", file=sys.stderr)
    text = table(rows) + (f"\n{args.images} images of {args.split}, {os.cpu_count()} CPUs; load average "
                          f"{load:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the CPUs).\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
