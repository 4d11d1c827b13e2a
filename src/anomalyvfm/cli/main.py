"""Command-line interface: `anomalyvfm fit | predict | serve | demo …`.

User mistakes (missing folders, bad options, unreadable models) end in one line on stderr and exit
code 2. In `predict`, an unreadable image is reported and recorded, the rest are still scored, and the
exit code is 1.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from PIL import Image

from anomalyvfm.data import LAYOUTS, IMAGE_SUFFIXES, evenly_spaced, list_images, load_dataset, load_rgb
from anomalyvfm.detector.detector import ADAPTER_DIR, HEADS_FILE, AnomalyDetector, DetectorConfig
from anomalyvfm.errors import UserInputError
from anomalyvfm.features.foreground import FOREGROUND_MODES
from anomalyvfm.adaptation.losses import LOSSES
from anomalyvfm.evaluation.report import format_table
from anomalyvfm.scoring.score_modes import SCORE_MODES
from anomalyvfm.scoring.scorers import SCORERS
from anomalyvfm.service.limits import API_KEY_ENV, DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, DEFAULT_MAX_PIXELS
from anomalyvfm.adaptation.training import AdaptationConfig
from anomalyvfm.maps.render import display_range, mask_image, overlay


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """Options that define a detector; shared by every command that fits one."""
    defaults = DetectorConfig()
    parser.add_argument("--data", required=True, help="dataset root folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout (default: mvtec_ad2)")
    parser.add_argument("--backbone", default=defaults.backbone, help="DINOv2 hub id or local model directory")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="short side fed to the backbone (px)")
    parser.add_argument("--layers", type=int, nargs="+", help="1-based backbone blocks to take patch features from")
    parser.add_argument("--scorer", choices=SCORERS, default=defaults.scorer, help="patch scorer")
    parser.add_argument("--coreset-ratio", type=float, default=defaults.coreset_ratio, help="kNN memory-bank fraction kept")
    parser.add_argument("--top-percent", type=float, default=defaults.top_percent, help="image score = mean of top %% patches")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="Gaussian smoothing of maps (px at backbone size)")
    parser.add_argument("--threshold-sigma", type=float, default=defaults.threshold_sigma,
                        help="thresholds = validation mean + N std (default 3)")
    add_view_options(parser)
    add_runtime_options(parser)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    parser.add_argument("--max-train-images", type=int, help="use at most N evenly spaced training images (quick runs)")
    add_lora_options(parser)


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    """LoRA adaptation on synthetic anomalies (README_lora.md); off unless --lora is given."""
    d = AdaptationConfig()
    lora = parser.add_argument_group("LoRA adaptation")
    lora.add_argument("--lora", action="store_true", help="adapt the backbone with LoRA and train anomaly heads")
    lora.add_argument("--lora-rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    lora.add_argument("--lora-alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    lora.add_argument("--lora-dropout", type=float, default=d.dropout, help=f"LoRA dropout (default {d.dropout:g})")
    lora.add_argument("--lora-steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    lora.add_argument("--lora-lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    lora.add_argument("--lora-batch-size", type=int, default=d.batch_size, help=f"crops per step, half synthetic "
                      f"(default {d.batch_size})")
    lora.add_argument("--lora-image-size", type=int, default=d.image_size, help="side of the square training crops, "
                      f"cut at the detector's scale; 0: the full short side (default {d.image_size})")
    lora.add_argument("--loss", choices=LOSSES, default=d.loss, help=f"patch loss (default {d.loss})")
    lora.add_argument("--temperature", type=float, default=d.temperature,
                      help=f"confidence-weighting temperature; large = plain BCE (default {d.temperature:g})")


def lora_settings(args: argparse.Namespace) -> dict | None:
    """The `DetectorConfig.lora` dict from the LoRA options; None without --lora."""
    if not args.lora:
        return None
    return asdict(AdaptationConfig(
        rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, steps=args.lora_steps, lr=args.lora_lr,
        batch_size=args.lora_batch_size, image_size=args.lora_image_size or None, loss=args.loss,
        temperature=args.temperature,
    ))


def add_view_options(parser: argparse.ArgumentParser) -> None:
    """High resolution, multi-scale, foreground guidance and automatic choice (README_tiling.md)."""
    defaults = DetectorConfig()
    parser.add_argument("--tile-size", type=int, default=defaults.tile_size,
                        help="score overlapping tiles of this many px (multiple of 14; 0 = whole image, default)")
    parser.add_argument("--tile-overlap", type=int, default=defaults.tile_overlap, help="tile overlap in px (multiple of 14)")
    parser.add_argument("--tile-scale", type=float, default=defaults.tile_scale,
                        help="resize the original image by this factor before tiling (default 1: native resolution)")
    parser.add_argument("--scales", type=int, nargs="+", help="several short sides, one scorer each, fused into one map")
    parser.add_argument("--foreground", choices=FOREGROUND_MODES, default=defaults.foreground,
                        help="suppress background patch scores: off (default), on, auto (decided on validation)")
    parser.add_argument("--auto", action="store_true",
                        help="choose image size, tiling, layers and scorer on validation + synthetic anomalies")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options that change how, not what, a detector computes."""
    parser.add_argument("--batch-size", type=int, default=DetectorConfig.batch_size,
                        help="images (tiles, when tiling) per backbone batch")
    parser.add_argument("--device", default=DetectorConfig.device, help="cpu, cuda, cuda:1 …")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="autocast dtype on GPU")
    parser.add_argument("--score", choices=SCORE_MODES, help="distance (patch scorer), head or fusion (need --lora); "
                        "fit: default distance; saved models: default the fitted one (thresholds of all modes are saved)")


def load_model(args: argparse.Namespace) -> AnomalyDetector:
    """A saved model or an exported bundle (`anomalyvfm.deploy`) with the runtime options applied."""
    from anomalyvfm.deploy.load import load_predictor

    return load_predictor(args.model, device=args.device, batch_size=args.batch_size, precision=args.precision,
                          score=args.score)


def config_from_args(args: argparse.Namespace) -> DetectorConfig:
    # A local backbone directory is stored absolute so the model loads from any working directory.
    backbone = str(Path(args.backbone).resolve()) if Path(args.backbone).is_dir() else args.backbone
    return DetectorConfig(
        backbone=backbone, layers=tuple(args.layers) if args.layers else None, image_size=args.image_size,
        scorer=args.scorer, coreset_ratio=args.coreset_ratio, top_percent=args.top_percent, sigma=args.sigma,
        threshold_sigma=args.threshold_sigma, seed=args.seed, batch_size=args.batch_size, device=args.device,
        precision=args.precision, score=args.score or "distance", lora=lora_settings(args),
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, tile_scale=args.tile_scale,
        scales=tuple(args.scales or ()), foreground=args.foreground, auto=args.auto,
    )


def fit_category(args: argparse.Namespace, category: str | None) -> tuple[AnomalyDetector, float]:
    """Fit a detector on a category's train split, thresholds on its validation split; return it and seconds."""
    dataset = load_dataset(args.data, category, args.layout, args.seed)
    start = time.perf_counter()
    detector = AnomalyDetector(config_from_args(args))
    train = [s.path for s in dataset.split("train")]
    if args.max_train_images:
        train = evenly_spaced(train, args.max_train_images)
    detector.fit(train, [s.path for s in dataset.split("validation")])
    return detector, time.perf_counter() - start


def cmd_fit(args: argparse.Namespace) -> int:
    detector, seconds = fit_category(args, args.category)
    out = detector.save(args.out)
    c = detector.config
    print(f"saved {out}  (fit {seconds:.1f}s, {c.summary()}, image threshold {c.image_threshold:.4g}, "
          f"pixel threshold {c.pixel_threshold:.4g})")
    if c.lora is not None:
        r = c.lora_record
        size = sum(p.stat().st_size for p in (out / ADAPTER_DIR).rglob("*") if p.is_file()) + (out / HEADS_FILE).stat().st_size
        print(f"LoRA: {r['steps_run']} steps in {r['seconds']:.1f}s, best step {r['best_step']} (validation score "
              f"{r['best_validation_score']:.3f}), score mode {c.score}, adapter + heads {size} bytes")
    return 0


def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders as their images (not recursive); error naming any missing path."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += list_images(path)
        elif path.exists():
            files.append(path)
        else:
            raise UserInputError(f"{path}: no such file or folder")
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """Unique, readable output stems: the file stem, prefixed by its folder (and index) on collisions."""
    stems = [f.stem for f in files]
    names = [f"{f.parent.name}_{f.stem}" if stems.count(f.stem) > 1 else f.stem for f in files]
    return [f"{i:05d}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def cmd_predict(args: argparse.Namespace) -> int:
    detector = load_model(args)
    files = expand_inputs(args.paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = detector.config
    vmin, vmax = display_range(c.validation_stats["pixel_score_mean"], c.pixel_threshold)
    failures = 0
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "is_anomalous", "error"])
        for name, pred in zip(output_names(files), detector.predict_iter(files)):
            if pred.error:
                failures += 1
                print(f"anomalyvfm: skipped {pred.error}", file=sys.stderr)
                writer.writerow([pred.source, "", "", pred.error])
                continue
            writer.writerow([pred.source, f"{pred.score:.6g}", int(pred.is_anomalous), ""])
            if not args.no_images:
                image = load_rgb(pred.source)
                Image.fromarray(overlay(image, pred.anomaly_map, vmin, vmax, pred.mask)).save(out / f"{name}_overlay.png")
                Image.fromarray(mask_image(pred.mask)).save(out / f"{name}_mask.png")
    print(f"scored {len(files) - failures} of {len(files)} images → {out / 'predictions.csv'}"
          + (f"; {failures} unreadable (see stderr)" if failures else ""))
    return 1 if failures else 0


def cmd_synth_preview(args: argparse.Namespace) -> int:
    from anomalyvfm.data.synthesis import preview_grid, synthetic_set

    dataset = load_dataset(args.data, args.category, args.layout)
    samples = dataset.split(args.split)[: max(2, args.count)]
    images = [load_rgb(s.path) for s in samples]
    grid = preview_grid(synthetic_set(images, per_stage=args.per_stage, seed=args.seed), columns=args.per_stage)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({3 * args.per_stage} synthetic anomalies, mask outlined in red)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from anomalyvfm.service.app import run_server  # FastAPI/uvicorn only for this command

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"anomalyvfm: warning: serving on {args.host} without an API key (set {API_KEY_ENV})", file=sys.stderr)
    run_server(args.model, args.host, args.port, api_key, args.max_pixels, args.max_bytes, args.max_files,
               device=args.device, batch_size=args.batch_size, precision=args.precision)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sklearn.metrics import roc_auc_score

    from anomalyvfm.demo import make_demo_dataset, make_random_backbone

    out = Path(args.out)
    print("DEMO: generated textured images and a RANDOMLY INITIALISED tiny DINOv2 — it shows the pipeline "
          "runs offline, not how well real DINOv2 features work.")
    make_demo_dataset(out / "data")
    backbone = make_random_backbone(out / "backbone")
    fit_args = build_parser().parse_args(["fit", "--data", str(out / "data"), "--category", "demo", "--backbone",
                                          str(backbone), "--image-size", "112", "--out", str(out / "model")])
    cmd_fit(fit_args)
    dataset = load_dataset(out / "data", "demo")
    test = dataset.split("test_public")
    detector = AnomalyDetector.load(out / "model")
    preds = detector.predict([s.path for s in test])
    auroc = roc_auc_score([s.label for s in test], [p.score for p in preds])
    print(f"demo image AUROC on test_public: {auroc:.3f} ({len(test)} images)")
    predict_args = build_parser().parse_args(["predict", "--model", str(out / "model"), "--out", str(out / "predictions"),
                                              str(out / "data" / "demo" / "test_public" / "bad")])
    return cmd_predict(predict_args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anomalyvfm.evaluation.evaluate import evaluate

    detector = load_model(args)
    dataset = load_dataset(args.data, args.category, args.layout)
    result = evaluate(detector, dataset, args.split, args.out)
    print(format_table(result), end="")
    print(f"wrote {Path(args.out) / 'metrics.json'} and report pictures")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomalyvfm.evaluation.benchmark import run_benchmark

    rows = run_benchmark(args, fit_category, VariantParser)
    print((Path(args.out) / "results.md").read_text())
    return 0 if rows else 2


def cmd_export_submission(args: argparse.Namespace) -> int:
    from anomalyvfm.evaluation.evaluate import export_submission

    detector = load_model(args)
    written = export_submission(detector, load_dataset(args.data, args.category, args.layout), args.out)
    print(", ".join(f"{split}: {n} images" for split, n in written.items()) + f" → {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from anomalyvfm.deploy.export import export_bundle

    detector = AnomalyDetector.load(args.model, device="cpu", score=args.score)
    calibration = []
    if args.data:  # the model's own good images: validation first, then evenly spaced training images
        dataset = load_dataset(args.data, args.category, args.layout)
        calibration = [s.path for s in dataset.split("validation")]
        calibration += evenly_spaced([s.path for s in dataset.split("train")], max(0, args.calibration_images - len(calibration)))
        calibration = calibration[: args.calibration_images]
    out = export_bundle(detector, args.out, args.format, args.precision, calibration)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"exported {out} ({args.format} {args.precision}, {size:.1f} MB"
          + (f", int8 calibrated on {len(calibration)} good images" if args.precision == "int8" else "") + ")")
    return 0


class VariantParser(argparse.ArgumentParser):
    """The fit options of one benchmark variant; a mistake is a `UserInputError`, not an exit."""

    def __init__(self) -> None:
        super().__init__(prog="anomalyvfm benchmark --variant", add_help=False)
        add_fit_options(self)

    def error(self, message: str):
        raise UserInputError(f"benchmark variant: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalyvfm", description="Visual anomaly detection on DINOv2 patch features.")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a detector on good images and save it")
    add_fit_options(fit)
    fit.add_argument("--category", help="category folder under --data (required for MVTec layouts)")
    fit.add_argument("--out", required=True, help="model directory to write")
    fit.set_defaults(func=cmd_fit)

    predict = sub.add_parser("predict", help="score images with a saved model")
    predict.add_argument("--model", required=True, help="model directory written by fit")
    predict.add_argument("paths", nargs="+", help=f"image files or folders ({', '.join(IMAGE_SUFFIXES)})")
    predict.add_argument("--out", required=True, help="output folder for predictions.csv and pictures")
    predict.add_argument("--no-images", action="store_true", help="write only predictions.csv")
    add_runtime_options(predict)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="MVTec AD 2 metrics and report pictures for a saved model")
    evaluate.add_argument("--model", required=True, help="model directory written by fit")
    evaluate.add_argument("--data", required=True, help="dataset root folder")
    evaluate.add_argument("--category", help="category folder under --data")
    evaluate.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout")
    evaluate.add_argument("--split", default="test_public", help="labelled split to score (default: test_public)")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json and report files")
    add_runtime_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser("benchmark", help="fit and evaluate every category; write results tables")
    add_fit_options(bench)
    bench.add_argument("--categories", default="all", help="'all' or a comma-separated list")
    bench.add_argument("--split", default="test_public", help="labelled split to evaluate on")
    bench.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                       help="a named variant: fit options over the command's own, e.g. 'tiled=--tile-size 448' (repeat)")
    bench.add_argument("--grid", action="append", default=[], metavar="OPTION=V1,V2",
                       help="ablation axis, e.g. 'tile-size=0,448' (repeat: all combinations, per variant)")
    bench.add_argument("--out", required=True, help="folder for results.{json,csv,md} and per-category reports")
    bench.set_defaults(func=cmd_benchmark)

    export = sub.add_parser("export-submission", help="write MVTec AD 2 benchmark-server files for test_private(_mixed)")
    export.add_argument("--model", required=True, help="model directory written by fit")
    export.add_argument("--data", required=True, help="dataset root folder")
    export.add_argument("--category", required=True, help="category folder under --data")
    export.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout")
    export.add_argument("--out", required=True, help="submission folder")
    add_runtime_options(export)
    export.set_defaults(func=cmd_export_submission)

    exp = sub.add_parser("export", help="write an inference bundle (OpenVINO / ONNX) that runs without torch")
    exp.add_argument("--model", required=True, help="model directory written by fit")
    exp.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    exp.add_argument("--format", choices=("openvino", "onnx"), default="openvino", help="engine (default openvino)")
    exp.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                     help="fp32, bf16 (OpenVINO on AMX/AVX-512 BF16 CPUs) or int8 (NNCF, needs --data)")
    exp.add_argument("--data", help="dataset root of the model's good images, to calibrate int8 (never test images)")
    exp.add_argument("--category", help="category folder under --data")
    exp.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout")
    exp.add_argument("--calibration-images", type=int, default=64, help="good images for int8 calibration "
                     "(validation first, then evenly spaced training images; default 64)")
    exp.add_argument("--score", choices=SCORE_MODES, help="score mode to export (only distance is exportable)")
    exp.set_defaults(func=cmd_export)

    synth = sub.add_parser("synth-preview", help="draw a grid of synthetic anomalies with their masks")
    synth.add_argument("--data", required=True, help="dataset root folder")
    synth.add_argument("--category", help="category folder under --data")
    synth.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout")
    synth.add_argument("--split", default="train", help="split whose images are used (default: train)")
    synth.add_argument("--count", type=int, default=12, help="source images to draw from")
    synth.add_argument("--per-stage", type=int, default=6, help="examples per stage (texture, structure, context)")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--out", required=True, help="PNG file to write")
    synth.set_defaults(func=cmd_synth_preview)

    serve = sub.add_parser("serve", help="serve a saved model over HTTP (POST /predict; docs at /docs)")
    serve.add_argument("--model", required=True, help="model directory written by fit")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--api-key", help="require this key in the X-API-Key header (default: $ANOMALYVFM_API_KEY; "
                                         "prefer the variable, command lines are visible to other users)")
    serve.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image accepted (pixels)")
    serve.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest upload accepted per image (bytes)")
    serve.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES, help="most images in one /predict/batch")
    add_runtime_options(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run fit and predict on a generated example (offline, random backbone)")
    demo.add_argument("--out", default="demo_output", help="folder for the example data, model and predictions")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as exc:
        print(f"anomalyvfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomalyvfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
