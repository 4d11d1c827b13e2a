"""Command-line interface: `anomalyvfm fit | predict | calibrate | update | serve | history | demo …`.

User mistakes (missing folders, bad options, unreadable models) end in one line on stderr and exit
code 2. In `predict`, an unreadable image is reported and recorded, the rest are still scored, and the
exit code is 1.
"""
from __future__ import annotations

# Only what every command needs is imported here: the torch side (detector, fitting, evaluation) is
# imported by the commands that use it, so `predict`/`serve` with an exported bundle never load torch.

import argparse
import itertools
import os
import shlex
import sys
import uuid
import warnings
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from anomalyvfm.detector.fit import Variant

from anomalyvfm.cli.options import add_fit_options, add_runtime_options, flag_name, runtime_from_args, settings_from_args
from anomalyvfm.data import LAYOUTS, IMAGE_SUFFIXES, evenly_spaced, list_images, load_dataset, load_rgb
from anomalyvfm.declare import SettingError
from anomalyvfm.deploy.bundle import AUTO, EXPORT_PRECISIONS, FORMATS as BUNDLE_FORMATS
from anomalyvfm.detector.settings import Runtime
from anomalyvfm.distributed.cli import (add_engine_options, check_local, engine_detector, fit_on_ray,
                                        predict_on_ray_command)
from anomalyvfm.errors import UserInputError, failure
from anomalyvfm.evaluation.report import format_table, threshold_lines
from anomalyvfm.maps.render import display_range, save_pictures
from anomalyvfm.optional import require
from anomalyvfm.prediction import Predictor
from anomalyvfm.outputs import PREDICTIONS_CSV, PredictionsCsv, output_errors, output_names, prepare_output_folder
from anomalyvfm.service.limits import API_KEY_ENV, add_limit_options, api_key_from, limits_from_args
from anomalyvfm.store.images import DEFAULT
from anomalyvfm.store.cli import (add_history_filters, add_store_options, export_history, record_file, recording,
                                  store_from_args)


def load_model(args: argparse.Namespace) -> Predictor:
    """A saved model or an exported bundle (`anomalyvfm.deploy`) with the runtime options applied: either
    predictor, so the commands use only the `Predictor` surface both offer."""
    from anomalyvfm.deploy.load import load_predictor

    return load_predictor(args.model, **runtime_from_args(args))


def variant_of(args: argparse.Namespace, name: str = "default") -> Variant:
    """The fit options of a command (or of one benchmark variant) as a `Variant`, validated."""
    from anomalyvfm.detector.fit import Variant

    calibration_defects = getattr(args, "calibration_defects", None)
    return Variant(name, settings_from_args(args), Runtime(**runtime_from_args(args)), args.max_train_images,
                   Path(calibration_defects) if calibration_defects else None, defect_set(args))


def defect_set(args: argparse.Namespace):
    """The labelled defects `fit --defects DIR` / `--defects-from-store URL` learns from, read now (a bad folder
    or store is one line before the fit, not after it); None without either."""
    from anomalyvfm.detector.defects import defects_from_folder, defects_from_store

    folder, url = getattr(args, "defects", None), getattr(args, "defects_from_store", None)
    if folder and url:
        raise UserInputError("give --defects DIR or --defects-from-store URL, not both")
    if folder:
        return defects_from_folder(folder)
    if not url:
        return None
    store = store_from_args(argparse.Namespace(store=url, keep_images=DEFAULT), create=False)  # its images beside it
    with closing(store):
        return defects_from_store(url, store)


def cmd_fit(args: argparse.Namespace) -> int:
    from anomalyvfm.detector.defect_thresholds import CalibrationDefectsWarning, calibration_warnings
    from anomalyvfm.detector.model_dir import ADAPTER_DIR, HEADS_FILE, check_writable
    from anomalyvfm.detector.fit import fit_category

    check_writable(args.out)
    variant = variant_of(args)
    if args.calibration_defects and args.engine == "ray":
        raise UserInputError("--calibration-defects needs --engine local (the thresholds are set in this process)")
    if args.calibration_defects:
        for text in calibration_warnings(args.calibration_defects, variant.defects):  # now, not after the fit
            print(f"anomalyvfm: warning: {text}", file=sys.stderr)
    if args.engine == "ray":
        detector, seconds = fit_on_ray(args, variant)
    else:
        check_local(args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationDefectsWarning)  # said above, before the fit
            detector, seconds = fit_category(args.data, args.category, args.layout, variant)
    with output_errors(args.out, lambda: "the model there, if any, is unchanged"):  # e.g. the disk filled up
        out = detector.save(args.out, store_backbone=not args.reference_backbone)
    thresholds = detector.thresholds()
    print(f"saved {out}  (fit {seconds:.1f}s, {detector.summary()}, image threshold {thresholds.image_threshold:.4g}, "
          f"pixel threshold {thresholds.pixel_threshold:.4g})")
    if detector.settings.threshold_rule == "budget" or args.calibration_defects:  # the evidence, as the report shows it
        print(threshold_lines(thresholds.evidence), end="")
    if detector.record.defects:
        d = detector.record.defects
        mirrored = ", each also learnt mirrored 3 ways" if d.get("copies") else ""
        print(f"defects: {d['images']} labelled images ({d['outlined']} outlined{mirrored}), ", end="")
        if d["kind"] == "lora":
            print(d["rule"])
        else:
            learnt = f"a {d['kind']} defect evidence at weight {d['weight']:g}" if d["weight"] else "no patch evidence"
            image = d["image_evidence"]["why"]
            print(f"{sum(d['patches_per_view'])} defect patches kept; learnt {learnt} ({d['choice']['rule']}){image}; "
                  f"mask cut {d['cut']['why']}")
    if detector.settings.lora is not None:
        r = detector.record.lora
        size = sum(p.stat().st_size for p in (out / ADAPTER_DIR).rglob("*") if p.is_file()) + (out / HEADS_FILE).stat().st_size
        print(f"LoRA: {r['steps_run']} steps in {r['seconds']:.1f}s, best step {r['best_step']} (validation score "
              f"{r['best_validation_score']:.3f}), score mode {detector.score_mode}, adapter + heads {size} bytes")
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


def cmd_predict(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        if args.store:
            raise UserInputError("--store records with --engine local only")
        return predict_on_ray_command(args, runtime_from_args(args))
    check_local(args)
    files = expand_inputs(args.paths)
    out = prepare_output_folder(args.out, files, args.model)  # before the model loads: a mistake costs nothing
    with recording(store_from_args(args)) as recorder:  # a bad --store also costs nothing
        return predict_files(args, files, out, load_model(args), recorder)


def predict_files(args: argparse.Namespace, files: list[Path], out: Path, detector: Predictor, recorder) -> int:
    thresholds = detector.thresholds()
    value_range = display_range(thresholds.validation_stats["pixel_score_mean"], thresholds.pixel_threshold)
    failures, run_id = 0, uuid.uuid4().hex  # the records of one run share its id (`request_id`)
    # closing(): a write error ends the scoring at once, and its progress bar before the error line
    with PredictionsCsv(out / PREDICTIONS_CSV) as table, closing(detector.predict_iter(files)) as predictions:
        for name, pred in zip(output_names(files), predictions):
            table.add(pred.source, pred.score, pred.is_anomalous, pred.error)
            if recorder is not None and not pred.error:
                record_file(recorder, detector, args.model, pred, run_id)
            if pred.error:
                failures += 1
                print(f"anomalyvfm: skipped {pred.error}", file=sys.stderr)
            elif args.images is not False:  # pictures unless --no-images
                try:
                    save_pictures(out, name, pred, value_range)
                except Exception as exc:  # e.g. out of memory for one huge picture: the scores still stand
                    failures += 1
                    print(f"anomalyvfm: no pictures for {failure(pred.source, exc)}", file=sys.stderr)
    print(f"scored {len(files) - failures} of {len(files)} images → {out / PREDICTIONS_CSV}"
          + (f"; {failures} failed (see stderr)" if failures else ""))
    return 1 if failures else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Re-estimate a model's thresholds as false-alarm budgets from more good images, no refit."""
    from dataclasses import replace

    from anomalyvfm.deploy.bundle import is_bundle
    from anomalyvfm.detector import model_dir
    from anomalyvfm.detector.settings import IMAGE_FALSE_ALARM_RATE
    from anomalyvfm.head.budget import add_good_images

    rate = args.false_alarm_rate
    if rate is not None and not 0 < rate < 1:
        raise UserInputError(f"--false-alarm-rate must be between 0 and 1 (exclusive), got {rate:g}")
    good = Path(args.good)
    if not good.is_dir():
        raise UserInputError(f"{good}: --good is not a folder")
    files = list_images(good)
    if not files:
        raise UserInputError(f"{good}: no images ({', '.join(IMAGE_SUFFIXES)}) in --good")
    if is_bundle(args.model):
        raise UserInputError(f"{args.model}: a bundle of the format before model format 3; export the model again "
                             "(anomalyvfm export --model M) and calibrate that")
    model_dir.check_writable(args.out)  # before any scoring
    stored = model_dir.read(args.model)
    predictor = load_model(args)  # whichever backend: an exported form needs no torch
    old = predictor.thresholds()
    scores, maxima = [], []
    for pred in predictor.predict_iter(files, "calibrate (good images)", decide=False):
        if pred.error:
            raise UserInputError(f"good image unreadable: {pred.error}")
        scores.append(pred.score)
        maxima.append(float(pred.anomaly_map.max()))
    rate = rate or stored.settings.false_alarm_rate or IMAGE_FALSE_ALARM_RATE
    new = add_good_images(old, scores, maxima, rate)
    calibration = replace(stored.calibration, modes={**stored.calibration.modes, predictor.score_mode: new})
    out = model_dir.write(args.out, replace(stored, calibration=calibration), copy_from=stored.directory)
    print(f"calibrated {out} from {len(files)} good images at a false-alarm rate of {rate:g}: image threshold "
          f"{old.image_threshold:.4g} → {new.image_threshold:.4g}, pixel threshold {old.pixel_threshold:.4g} → "
          f"{new.pixel_threshold:.4g}")
    for level, evidence in new.evidence.items():
        print(f"  {level}: {evidence['text']}")
    return 0


def labelled_in_store(args: argparse.Namespace, done: set[str]) -> tuple[list, list, str]:
    """The store's labelled inspections to learn from, as `deploy.update.Labelled`: good ones the model flagged
    (not yet learnt: ids in `done` are skipped) and defects, each once by image digest; and a note of what had
    no kept image."""
    from anomalyvfm.deploy.update import Labelled

    store = store_from_args(args, create=False)
    try:
        found = {label: store.labelled(label) for label in ("good", "defect")}
    finally:
        store.close()
    chosen: dict[str, list] = {"good": [], "defect": []}
    seen, missing = set(), 0
    for label, records in found.items():
        for r in records:
            if r.sha256 in seen or r.id in done or (label == "good" and not r.is_anomalous):
                continue
            if r.image_path is None:
                missing += 1
                continue
            seen.add(r.sha256)
            chosen[label].append(Labelled(r.image_path, label, r.id))
    note = f"; {missing} labelled inspections have no kept image (see --keep-images)" if missing else ""
    return chosen["good"], chosen["defect"], note


def cmd_update(args: argparse.Namespace) -> int:
    """A new model version from operator labels (and/or a folder of good images), without refitting."""
    from anomalyvfm.deploy.bundle import is_bundle
    from anomalyvfm.deploy.update import Labelled, update_model
    from anomalyvfm.detector import model_dir

    if not args.store and not args.good:
        raise UserInputError("update needs --store URL (operator labels) or --good DIR (good images), or both")
    if is_bundle(args.model):
        raise UserInputError(f"{args.model}: a bundle of the format before model format 3; export the model again "
                             "(anomalyvfm export --model M) and update that")
    stored = model_dir.read(args.model)
    done = {i for u in stored.record.updates for i in u.get("inspections", [])}
    good, defects, note = labelled_in_store(args, done) if args.store else ([], [], "")
    if args.good:
        folder = Path(args.good)
        if not folder.is_dir():
            raise UserInputError(f"{folder}: --good is not a folder")
        good += [Labelled(path, "good") for path in list_images(folder)]
    if not good:
        where = f"{args.store} has no inspection labelled good that the model flagged" if args.store else f"{args.good} has no images"
        raise UserInputError(f"nothing to learn: {where}{note}")
    model_dir.check_writable(args.out)  # before any scoring
    source = " + ".join(part for part in (args.store and f"store {args.store}", args.good and f"folder {args.good}") if part)
    report = update_model(load_model(args), stored, args.out, good, defects, source)
    lineage, t = report.lineage, report.thresholds
    print(f"updated {report.directory} from {len(good)} good and {len(defects)} defect images ({source}{note}): "
          f"{', '.join(map(str, lineage['rows_added']))} bank rows added; image threshold "
          f"{lineage['image_threshold'][0]:.4g} → {t.image_threshold:.4g}, pixel threshold "
          f"{lineage['pixel_threshold'][0]:.4g} → {t.pixel_threshold:.4g}")
    if report.defects_still_passed:
        print(f"  {len(report.defects_still_passed)} labelled defects pass under the new threshold "
              f"({t.evidence['labels']['text'] if 'labels' in t.evidence else 'kept'}): "
              + ", ".join(report.defects_still_passed[:5]))
    return 0


def cmd_synth_preview(args: argparse.Namespace) -> int:
    from anomalyvfm.data.synthesis import ALL_STAGES, GLOBAL_STAGES, STAGES, SynthesisConfig, preview_grid, synthetic_set

    dataset = load_dataset(args.data, args.category, args.layout)
    samples = dataset.split(args.split)[: max(2, args.count)]
    images = [load_rgb(s.path) for s in samples]
    stages = {"local": STAGES, "global": GLOBAL_STAGES, "all": ALL_STAGES}[args.stages]
    config = SynthesisConfig(stages=stages, weights=(1.0,) * len(stages))
    grid = preview_grid(synthetic_set(images, per_stage=args.per_stage, seed=args.seed, config=config),
                        columns=args.per_stage)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(stages) * args.per_stage} synthetic anomalies, mask outlined in red)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    run_server = require("anomalyvfm.service.server", "serve", "anomalyvfm serve").run_server  # FastAPI only here

    api_key = api_key_from(args.api_key, os.environ)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"anomalyvfm: warning: serving on {args.host} without an API key (set {API_KEY_ENV})", file=sys.stderr)
    store = store_from_args(args)
    try:
        run_server(args.model, args.host, args.port, api_key, limits_from_args(args), store=store,
                   **runtime_from_args(args))
    finally:
        if store is not None:
            store.close()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """Export the store's records (oldest first, optionally filtered) to CSV or Parquet."""
    from anomalyvfm.store import Filters

    store = store_from_args(args)  # no images kept: history only reads
    try:
        filters = Filters(args.since, args.until, args.verdict, args.label, args.model_version)
        count = export_history(store, args.out, filters)
    finally:
        store.close()
    print(f"exported {count} inspections from {store.name} → {args.out}")
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
    from anomalyvfm.detector.detector import AnomalyDetector

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
    with engine_detector(args, detector, runtime_from_args(args)) as detector:
        result = evaluate(detector, dataset, args.split, args.out)
    print(format_table(result), end="")
    print(f"wrote {Path(args.out) / 'metrics.json'} and report pictures")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomalyvfm.evaluation.benchmark import find_categories, run_benchmark

    categories = find_categories(Path(args.data), args.categories)
    variants = benchmark_variants(args)
    rows = run_benchmark(Path(args.data), args.layout, categories, variants, args.split, Path(args.out),
                         nested=len(variants) > 1 or bool(args.variant))
    print((Path(args.out) / "results.md").read_text())
    return 0 if rows else 2


def benchmark_variants(args: argparse.Namespace) -> list[Variant]:
    """Every variant of a benchmark: `--variant`s (or the command itself) x all `--grid` combinations.

    A variant's options are parsed over a copy of the command's own, so they override only what they name.
    """
    named = []
    for spec in args.variant or ["default="]:
        name, sep, options = spec.partition("=")
        if not sep or not name.strip():
            raise UserInputError(f"--variant needs NAME=OPTIONS, got '{spec}'")
        named.append((name.strip(), options))
    axes = []
    for spec in args.grid:
        option, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserInputError(f"--grid needs OPTION=V1,V2, got '{spec}'")
        axes.append([(f"{option}={value}", f"--{option} {value}") for value in values.split(",")])
    result = []
    for (name, options), combo in itertools.product(named, itertools.product(*axes)):
        argv = shlex.split(" ".join([options, *(o for _, o in combo)]))
        parsed = VariantParser().parse_args(["--data", args.data, *argv], namespace=argparse.Namespace(**vars(args)))
        labels = [label for label, _ in combo]
        if name != "default" or not labels:  # a grid alone is named by its values only
            labels.insert(0, name)
        result.append(variant_of(parsed, "+".join(labels)))
    return result


def cmd_export_submission(args: argparse.Namespace) -> int:
    from anomalyvfm.evaluation.evaluate import export_submission

    detector = load_model(args)
    with engine_detector(args, detector, runtime_from_args(args)) as detector:
        written = export_submission(detector, load_dataset(args.data, args.category, args.layout), args.out)
    print(", ".join(f"{split}: {n} images" for split, n in written.items()) + f" → {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from anomalyvfm.deploy.export import export_model

    calibration = []
    if args.data:  # the model's own good images: validation first, then evenly spaced training images
        dataset = load_dataset(args.data, args.category, args.layout)
        calibration = [s.path for s in dataset.split("validation")]
        calibration += evenly_spaced([s.path for s in dataset.split("train")], max(0, args.calibration_images - len(calibration)))
        calibration = calibration[: args.calibration_images]
    out, form = export_model(args.model, args.format, args.precision, calibration, args.out)
    size = sum(p.stat().st_size for p in (out / form).iterdir()) / 2**20
    precision = form.split("-")[1]
    print(f"exported {out / form} ({args.format} {precision}{' (auto)' if args.precision == AUTO else ''}, {size:.1f} MB"
          + (f", int8 calibrated on {len(calibration)} good images" if precision == "int8" else "") + ")")
    return 0


class VariantParser(argparse.ArgumentParser):
    """The fit options of one benchmark variant; a mistake is a `UserInputError`, not an exit."""

    def __init__(self) -> None:
        super().__init__(prog="anomalyvfm benchmark --variant", add_help=False)
        add_fit_options(self)

    def error(self, message: str):
        raise UserInputError(f"benchmark variant: {message}")


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by fit (or a bundle from export)")


def _dataset_options(parser: argparse.ArgumentParser, required: bool = True, category_required: bool = False) -> None:
    parser.add_argument("--data", required=required, help="dataset root folder")
    parser.add_argument("--category", required=category_required, help="category folder under --data")
    parser.add_argument("--layout", choices=LAYOUTS, default="mvtec_ad2", help="dataset layout")


def _add_fit(sub) -> None:
    fit = sub.add_parser("fit", help="fit a detector on good images and save it")
    add_fit_options(fit)
    fit.add_argument("--category", help="category folder under --data (required for MVTec layouts)")
    fit.add_argument("--out", required=True, help="model directory to write")
    fit.add_argument("--calibration-defects", metavar="DIR",
                     help="also set the thresholds from these labelled defects: DIR/bad/NAME.png with "
                          "DIR/ground_truth/bad/NAME_mask.png (the test_public layout); recorded in the model")
    fit.add_argument("--defects", metavar="DIR",
                     help="learn from these labelled real defects: DIR/bad/NAME.png, outlined by "
                          "DIR/ground_truth/bad/NAME_mask.png (the test_public layout; an image without a mask counts "
                          "as 'somewhere in this image'); their patches raise the scores of similar ones (with --lora: "
                          "the outlined ones train the adapter and heads); no threshold is set from them; recorded "
                          "in the model")
    fit.add_argument("--defects-from-store", metavar="URL",
                     help="learn from the inspections labelled defect in this inspection store (their kept images, "
                          "without outlines), as --defects does")
    fit.add_argument("--reference-backbone", action="store_true",
                     help="store only the backbone's hub id or path, not its weights (smaller; not portable)")
    add_engine_options(fit)
    fit.set_defaults(func=cmd_fit)


def _add_predict(sub) -> None:
    predict = sub.add_parser("predict", help="score images with a saved model")
    _model_option(predict)
    predict.add_argument("paths", nargs="+", help=f"image files or folders ({', '.join(IMAGE_SUFFIXES)})")
    predict.add_argument("--out", required=True, help="output folder for predictions.csv and pictures")
    predict.add_argument("--images", action=argparse.BooleanOptionalAction,
                         help="write overlay and mask pictures (default: yes with --engine local, no with ray)")
    add_runtime_options(predict)
    add_engine_options(predict, predict=True)
    add_store_options(predict)
    predict.set_defaults(func=cmd_predict)


def _add_dataset_scoring(sub, name: str, help: str, func, out: str, split: bool = False,
                         category_required: bool = False) -> None:
    """A verb that scores a dataset's splits with a saved model: evaluate, export-submission."""
    verb = sub.add_parser(name, help=help)
    _model_option(verb)
    _dataset_options(verb, category_required=category_required)
    if split:
        verb.add_argument("--split", default="test_public", help="labelled split to score (default: test_public)")
    verb.add_argument("--out", required=True, help=out)
    add_runtime_options(verb)
    add_engine_options(verb)
    verb.set_defaults(func=func)


_add_evaluate = partial(_add_dataset_scoring, name="evaluate", split=True, func=cmd_evaluate,
                        help="MVTec AD 2 metrics, report.html and report pictures for a saved model",
                        out="folder for metrics.json and report files")


def _add_benchmark(sub) -> None:
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


_add_export_submission = partial(_add_dataset_scoring, name="export-submission", category_required=True,
                                 help="write MVTec AD 2 benchmark-server files for test_private(_mixed)",
                                 func=cmd_export_submission, out="submission folder")


def _add_export(sub) -> None:
    exp = sub.add_parser("export", help="add an OpenVINO / ONNX form of the backbone to a model: it then runs without torch")
    exp.add_argument("--model", required=True, help="model directory written by fit")
    exp.add_argument("--out", help="write a copy for a line PC here instead (the model without its torch weights, "
                                   "plus the form; must not exist); default: add the form to --model")
    exp.add_argument("--format", choices=BUNDLE_FORMATS, default="openvino", help="engine (default openvino)")
    exp.add_argument("--precision", choices=EXPORT_PRECISIONS, default=AUTO,
                     help="fp32, bf16 (OpenVINO on AMX/AVX-512 BF16 CPUs), int8 (NNCF, needs --data) or auto (default): "
                          "the fastest that met parity and is possible here — bf16 where the CPU has it (OpenVINO), "
                          "else int8 with --data, else fp32")
    _dataset_options(exp, required=False)
    exp.add_argument("--calibration-images", type=int, default=64, help="good images for int8 calibration "
                     "(validation first, then evenly spaced training images; default 64)")
    exp.set_defaults(func=cmd_export)


def _add_calibrate(sub) -> None:
    calibrate = sub.add_parser("calibrate", help="re-estimate thresholds as false-alarm budgets from more good "
                                                 "images, without refitting (model directory or bundle)")
    _model_option(calibrate)
    calibrate.add_argument("--good", required=True, help="folder of good (defect-free) images, e.g. the first shift's parts")
    calibrate.add_argument("--false-alarm-rate", type=float, metavar="R",
                           help="reject at most this fraction of good parts, and outline something on at most this "
                                "fraction of good images (default: the model's --false-alarm-rate, else 0.01)")
    calibrate.add_argument("--out", required=True, help="model directory (or bundle) to write; may be --model itself")
    add_runtime_options(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)


def _add_update(sub) -> None:
    update = sub.add_parser("update", help="a new model version from operator labels and good images, without refitting "
                                           "(docs/line.md)")
    _model_option(update)
    update.add_argument("--good", help="folder of good images to add (e.g. false alarms collected by hand)")
    update.add_argument("--out", required=True, help="model directory to write (a new version; may be --model itself)")
    add_store_options(update)
    add_runtime_options(update)
    update.set_defaults(func=cmd_update)


def _add_synth_preview(sub) -> None:
    synth = sub.add_parser("synth-preview", help="draw a grid of synthetic anomalies with their masks")
    _dataset_options(synth)
    synth.add_argument("--split", default="train", help="split whose images are used (default: train)")
    synth.add_argument("--count", type=int, default=12, help="source images to draw from")
    synth.add_argument("--per-stage", type=int, default=6, help="examples per stage")
    synth.add_argument("--stages", choices=("local", "global", "all"), default="local",
                       help="local (texture, structure, context), global (colour, missing, duplicate) or all")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--out", required=True, help="PNG file to write")
    synth.set_defaults(func=cmd_synth_preview)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="serve a saved model over HTTP (web page at /, POST /predict, docs at /docs)")
    _model_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--api-key", help="require this key in the X-API-Key header (default: $ANOMALYVFM_API_KEY; "
                                         "prefer the variable, command lines are visible to other users)")
    add_runtime_options(serve)
    add_limit_options(serve)
    add_store_options(serve)
    serve.set_defaults(func=cmd_serve)


def _add_history(sub) -> None:
    history = sub.add_parser("history", help="export the inspection store's records to CSV or Parquet")
    add_store_options(history, required=True)
    history.add_argument("--out", required=True, help="file to write: .csv or .parquet (replaced atomically)")
    add_history_filters(history)
    history.set_defaults(func=cmd_history)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="run fit and predict on a generated example (offline, random backbone)")
    demo.add_argument("--out", default="demo_output", help="folder for the example data, model and predictions")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalyvfm", description="Visual anomaly detection on DINOv2 patch features.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_fit, _add_predict, _add_evaluate, _add_benchmark, _add_export_submission, _add_export,
                _add_calibrate, _add_update, _add_synth_preview, _add_serve, _add_history, _add_demo):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is shown escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingError as exc:
        print(f"anomalyvfm: error: {exc.render(flag_name)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "transformers"):  # a bundle-only install (line PC)
            print(f"anomalyvfm: error: {args.command} with a model directory needs torch: "
                  "pip install 'anomalyvfm[torch]' (or export the model and use the bundle)", file=sys.stderr)
            return 2
        raise
    except UserInputError as exc:
        print(f"anomalyvfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomalyvfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
