"""Thresholds of a model with defects from *held-out* predictions of the defects it learnt (a defects-study arm).

    python benchmarks/defects_heldout_thresholds.py --data ../shared/data --out OUT --rows ROWS [--categories all]

Runs after `defects_study.py` on its OUT (the saved default models and cached view features) and its rows (ROWS, e.g.
benchmarks/results/defects_study.json). `fit --defects DIR --calibration-defects DIR` sets the thresholds on defects
the model has just learnt: scored by evidence learnt from themselves they look separable, and the study measured the
thresholds to be optimistic (kolektor, k = 10: SegF1 0.535 → 0.247). Here each drawn defect is instead scored by the
evidence learnt — same kind and weight as the row's choice — from the *other* drawn defects (what the choice rule's
folds already do), the validation images by the full evidence, and `defect_thresholds` sets the thresholds on those.
Only rows where a kind was chosen differ from the in-sample arm; the model of each row is rebuilt from its recorded
choice, and its SegF1 is checked against the row's before anything is reported. Output: OUT/defects_heldout_thresholds.json.
(Built into `fit` at commit a09cce1 and judged on fresh draws 9-11, it lost to both arms it had beaten here and was
reverted: docs/adaptation.md.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import defects_study as study
from anomalyvfm.detector.defects import Learner
from anomalyvfm.head.defects import DefectEvidence


def held_out_rows(data: Path, out: Path, category: str, rows: list[dict]) -> list[dict]:
    scored = study.scored_category(data, "", category, out)  # the study saved the model: loaded, not fitted
    detector, normal, bad = scored.detector, scored.normal, scored.bad
    frozen_arrays, frozen_calibration = detector.pipeline.head.state_dict(), detector.calibration
    learner, results = Learner(detector.pipeline.head, frozen_calibration), []
    for row in rows:
        kind, weight = row["record defects"]["kind"], row["record defects"]["weight"]
        if row["category"] != category or weight == 0:
            continue
        drawn = [i for i, image in enumerate(bad) if image.scored.source in row["drawn"]]
        (rest, labels), labelled = scored.split(drawn), [bad[i] for i in drawn]
        evidence = study.with_arrays(detector, {**frozen_arrays, **learner.learn(kind, labelled)[0]}, weight, normal)
        if study.figures(detector, rest, evidence, labels)["seg_f1"] != row["defects"]["seg_f1"]:
            raise SystemExit(f"{category} k={row['k']} seed={row['seed']}: the rebuilt model differs from the row's")
        held = []
        for j, image in enumerate(labelled):
            taught = learner.learn(kind, [d for m, d in enumerate(labelled) if m != j])[0]
            e = DefectEvidence({**frozen_arrays, **taught}, evidence.gaussians) if taught else None
            held.append(image.scored if e is None else e.raised(image, e.of(image), weight))
        thresholds = study.drawn_thresholds(detector, evidence, normal, labelled, held)
        results.append({key: row[key] for key in ("category", "k", "seed", "defects", "defects + calibration")}
                       | {"defects + held-out calibration": study.figures(detector, rest, evidence, labels, thresholds)})
        print(json.dumps({key: results[-1][key] for key in ("category", "k", "seed")}), flush=True)
        detector.pipeline.use_head_arrays(frozen_arrays)
        detector.pipeline.configure(defect_weight=None)
        detector.calibration = frozen_calibration
    return results


def table(results: list[dict], rows: list[dict]) -> str:
    """Means over the draws per category and k: `fit --defects`, thresholds from its defects in-sample and held out;
    a row without a chosen kind counts with its in-sample figures (the model is the frozen one there)."""
    held = {(r["category"], r["k"], r["seed"]): r["defects + held-out calibration"] for r in results}
    arms = (lambda r: r["defects"], lambda r: r["defects + calibration"],
            lambda r: held.get((r["category"], r["k"], r["seed"]), r["defects + calibration"]))
    lines = ["| category | k | SegF1 `fit --defects` | + thresholds in-sample | + thresholds held out | ClassF1 `fit --defects` "
             "| in-sample | held out |", "|---|---|---|---|---|---|---|---|"]
    groups = [(c, k) for c in dict.fromkeys(r["category"] for r in rows) for k in (3, 10)]
    means = {}
    for category, k in groups:
        these = [r for r in rows if (r["category"], r["k"]) == (category, k)]
        means[(category, k)] = [np.mean([arm(r)[f] for r in these]) for f in ("seg_f1", "class_f1") for arm in arms]
    for k in (3, 10):
        means[("mean", k)] = np.mean([means[g] for g in groups if g[1] == k], axis=0)
    return "\n".join(lines + [f"| {c} | {k} | " + " | ".join(f"{x:.3f}" for x in cells) + " |"
                              for (c, k), cells in means.items()]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="the defects study's OUT (models and cached features)")
    parser.add_argument("--rows", required=True, help="the defects study's rows (its defects_study.json)")
    parser.add_argument("--categories", default="all")
    args = parser.parse_args()
    rows = json.loads(Path(args.rows).read_text())
    categories = study.CATEGORIES if args.categories == "all" else args.categories.split(",")
    results = [r for c in categories for r in held_out_rows(Path(args.data), Path(args.out), c, rows)]
    (Path(args.out) / "defects_heldout_thresholds.json").write_text(json.dumps(results, indent=2) + "\n")
    (Path(args.out) / "defects_heldout_thresholds.md").write_text(table(results, rows))


if __name__ == "__main__":
    main()
