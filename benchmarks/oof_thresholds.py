"""Budget thresholds from out-of-fold training scores vs today's default rule, per real category.

For each category: a fit with `--threshold-rule budget` (out-of-fold pass on) on N evenly spaced training
images, timed, with the out-of-fold work (feature spill + scoring) timed on its own; today's default rule
re-fitted on the same bank (one validation pass). With `--ab CAT`, also a plain default fit on the same
images, timed (the fit time without the out-of-fold pass measured directly; its thresholds must equal the
default rule on the budget model's bank, which checks that tracking sources changes no bank).
test_public is then scored once and only reported: SegF1 and ClassF1 at each rule's thresholds with their
oracles, and good test images with a false verdict / any outlined pixel. Validation false alarms (images
rejected / images with any outlined pixel, from the validation record every model keeps) against the
budget's predicted rate (nothing is chosen here: the default stays).

    nice -n 19 python benchmarks/oof_thresholds.py --data ../shared/data \
        --backbone ~/.cache/anomalyvfm/dinov2-vits14 --max-train 60 --out /tmp/oof_bench
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from threshold_rules import _predict, study_parser  # noqa: E402  (the benchmark next to this one)

from anomalyvfm.data import evenly_spaced, load_dataset  # noqa: E402
from anomalyvfm.detector import out_of_fold, pipeline  # noqa: E402
from anomalyvfm.detector.calibration import calibrate  # noqa: E402
from anomalyvfm.detector.detector import AnomalyDetector  # noqa: E402
from anomalyvfm import metrics as M  # noqa: E402
from anomalyvfm.maps.thresholds import clopper_pearson  # noqa: E402


def _timed(owner, name: str, clock: dict) -> None:
    """Wrap `owner.name` so its wall time adds up in `clock[name]`."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def run_category(data: Path, category: str, backbone: str, max_train: int, rate: float, ab: bool) -> dict:
    dataset = load_dataset(data, category)
    train = evenly_spaced([s.path for s in dataset.split("train")], max_train)
    validation = [s.path for s in dataset.split("validation")]
    plain, plain_fit = None, None
    if ab:  # a plain default fit too, after a warm-up (first loads and thread pools), for the fit time without
        AnomalyDetector(backbone=backbone).fit(train[:3], validation[:2], progress=False)
        start = time.perf_counter()
        plain = AnomalyDetector(backbone=backbone).fit(train, validation, progress=False)
        plain_fit = time.perf_counter() - start
    clock: dict = {}
    _timed(pipeline, "out_of_fold_scores", clock)
    _timed(out_of_fold.FeatureSpill, "add", clock)
    start = time.perf_counter()
    detector = AnomalyDetector(backbone=backbone, threshold_rule="budget", false_alarm_rate=rate).fit(
        train, validation, progress=False)
    budget_fit = time.perf_counter() - start
    budget = detector.thresholds()
    oof_seconds = clock.get("out_of_fold_scores", 0.0) + clock.get("add", 0.0)
    # today's default rule on the budget model's bank (a validation pass): equal to the plain fit's thresholds
    # when tracking image sources changed nothing in the bank
    detector.pipeline.settings = replace(detector.settings, threshold_rule=None, false_alarm_rate=None)
    default = calibrate(detector.pipeline, validation, "distance", False).thresholds()
    same_bank = None if plain is None else (plain.thresholds().image_threshold == default.image_threshold
                                            and plain.thresholds().pixel_threshold == default.pixel_threshold)
    test = dataset.split("test_public")
    scores, maps, masks = _predict(detector, [s.path for s in test], [s.mask_path if s.label else None for s in test])
    scores, labels = np.array(scores), np.array([int(m.any()) for m in masks])
    maps = [m.astype(np.float16) for m in maps]
    maxima = np.array([float(m.max()) for m in maps])
    good = labels == 0
    rules = {"default (sigma 3)": default, f"budget {rate:g}": budget}
    seg = M.seg_f1_at(masks, maps, [t.pixel_threshold for t in rules.values()])
    out = {"category": category, "train_images": len(train), "validation_images": len(validation),
           "fit_seconds_budget": round(budget_fit, 1),
           "fit_seconds_default": None if plain_fit is None else round(plain_fit, 1),
           "oof_seconds": round(oof_seconds, 1), "same_bank_thresholds": same_bank,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "seg_f1_max_oracle": M.seg_f1_max(masks, maps)[0], "f1_max_oracle": M.f1_max(labels, scores)[0],
           "rules": {}}
    for (name, t), seg_f1 in zip(rules.items(), seg):
        checks = {}
        for level, key, threshold in (("image", "image", t.image_threshold), ("pixel", "map_max", t.pixel_threshold)):
            values = np.array(t.normal_samples["validation"][key])  # every rule keeps the validation record
            k = int((values > threshold).sum())
            checks[level] = {"false_alarms": k, "images": len(values), "ci95": clopper_pearson(k, len(values)),
                             "predicted": t.evidence[level].get("predicted_rate")}
        out["rules"][name] = {
            "image_threshold": t.image_threshold, "pixel_threshold": t.pixel_threshold,
            "seg_f1": seg_f1, "class_f1": M.class_f1(labels, scores, t.image_threshold),
            "test_good_rejected": f"{int((scores[good] > t.image_threshold).sum())}/{int(good.sum())}",
            "test_good_outlined": f"{int((maxima[good] > t.pixel_threshold).sum())}/{int(good.sum())}",
            "validation": checks, "evidence_text": {level: e.get("text") for level, e in t.evidence.items()}}
    return out


def table(results: list[dict]) -> str:
    lines = ["| category | rule | SegF1 / oracle | ClassF1 / oracle | val. false alarms image (95 % CI) | "
             "val. images outlined (95 % CI) | test good rejected | test good outlined |", "|" + "---|" * 8]
    for r in results:
        for name, x in r["rules"].items():
            cells = [r["category"], name, f"{x['seg_f1']:.3f} / {r['seg_f1_max_oracle']:.3f}",
                     f"{x['class_f1']:.3f} / {r['f1_max_oracle']:.3f}"]
            for level in ("image", "pixel"):
                c = x["validation"][level]
                cell = f"{c['false_alarms']}/{c['images']} ({c['ci95'][0]:.2f}–{c['ci95'][1]:.2f})"
                if c["predicted"] is not None:
                    inside = c["ci95"][0] <= c["predicted"] <= c["ci95"][1]
                    cell += f", predicted {c['predicted']:g}: {'in' if inside else 'OUT'}"
                cells.append(cell)
            cells += [x["test_good_rejected"], x["test_good_outlined"]]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| category | train | validation | fit s budget | of which out-of-fold s | out-of-fold share "
                  "(of the fit without it) | fit s default (separate fit) | same bank | peak RSS MB |", "|" + "---|" * 9]
    for r in results:
        share = r["oof_seconds"] / (r["fit_seconds_budget"] - r["oof_seconds"])
        same = {True: "yes", False: "NO", None: "–"}[r["same_bank_thresholds"]]
        lines.append(f"| {r['category']} | {r['train_images']} | {r['validation_images']} | {r['fit_seconds_budget']} | "
                     f"{r['oof_seconds']} | {share:+.0%} | {r['fit_seconds_default'] or '–'} | {same} | "
                     f"{r['peak_rss_mb']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-train", type=int, default=60)
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--ab", default="", help="categories that also get a plain default fit, timed (comma list)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for category in args.categories.split(","):
        path = args.out / f"{category}.json"
        if not path.exists():
            path.write_text(json.dumps(run_category(args.data, category, args.backbone, args.max_train, args.rate,
                                                    category in args.ab.split(",")),
                                       indent=2) + "\n")
        results.append(json.loads(path.read_text()))
        print(path.read_text(), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
