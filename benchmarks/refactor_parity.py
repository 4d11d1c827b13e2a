"""Scores, maps and verdicts before and after a refactor of the code after the backbone, for every variant.

Run once with the old code on PYTHONPATH (`record`: fits each variant on a generated dataset with a tiny random
DINOv2, saves the model directory, an ONNX bundle and the predictions), then with the new code (`check`: loads the
same model directories and bundles, predicts again and prints the largest differences):

    PYTHONPATH=OLD/src python benchmarks/refactor_parity.py record --out /tmp/parity
    PYTHONPATH=NEW/src python benchmarks/refactor_parity.py check --out /tmp/parity
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

VARIANTS = {
    "knn": {},
    "mahalanobis": {"scorer": "mahalanobis"},
    "multiscale": {"scales": (84, 112)},
    "tiles": {"tile_size": 56, "tile_overlap": 14},
    "foreground": {"foreground": "on"},
    "global": {"image_evidence": "patch+global"},
    "mebin": {"binarize": "mebin"},
}
FORMS = ("model", "bundle")  # a model directory (torch features) and an ONNX fp32 bundle


def _predict(predictor, images: list[str]) -> dict[str, np.ndarray]:
    preds = predictor.predict(images, progress=False)
    return {"score": np.array([p.score for p in preds]), "verdict": np.array([p.is_anomalous for p in preds]),
            "maps": np.stack([p.anomaly_map for p in preds]), "masks": np.stack([p.mask for p in preds])}


def record(out: Path) -> None:
    from anomalyvfm.deploy.export import export_model
    from anomalyvfm.deploy.load import load_predictor
    from anomalyvfm.demo import make_demo_dataset, make_random_backbone
    from anomalyvfm.detector.detector import AnomalyDetector

    backbone = make_random_backbone(out / "backbone")
    make_demo_dataset(out / "data", "demo", n_train=12, n_val=5, n_test=8, seed=1)
    split = lambda name: sorted(str(p) for p in (out / "data" / "demo" / name).rglob("*.png") if "ground_truth" not in p.parts)
    for name, options in VARIANTS.items():
        detector = AnomalyDetector(backbone=str(backbone), image_size=112, **options)
        detector.fit(split("train"), split("validation"), progress=False)
        detector.save(out / name / "model")
        export_model(out / name / "model", "onnx", "fp32", out=out / name / "bundle")
        for form in FORMS:
            np.savez(out / name / f"{form}.npz", **_predict(load_predictor(out / name / form), split("test_public")))
    (out / "images.json").write_text(json.dumps(split("test_public")))


def check(out: Path) -> None:
    """Each recorded form loaded by the new code, and ("form") the recorded model exported by the new code
    to an ONNX fp32 form, against what the old code's bundle gave."""
    from anomalyvfm.deploy.export import export_model
    from anomalyvfm.deploy.load import load_predictor

    images = json.loads((out / "images.json").read_text())
    for name in VARIANTS:
        copy = out / name / "form"
        if not copy.exists():
            export_model(out / name / "model", "onnx", "fp32", out=copy)
        for form, path, recorded in (*((f, out / name / f, f) for f in FORMS), ("form", copy, "bundle")):
            before = dict(np.load(out / name / f"{recorded}.npz"))
            after = _predict(load_predictor(path), images)
            rel = {k: float(np.max(np.abs(after[k] - before[k]) / np.maximum(np.abs(before[k]), 1e-12)))
                   for k in ("score", "maps")}
            same = {k: bool(np.array_equal(after[k], before[k])) for k in ("verdict", "masks")}
            print(f"{name:12s} {form:6s} score rel {rel['score']:.2e}  map rel {rel['maps']:.2e}  "
                  f"verdicts equal {same['verdict']}  masks equal {same['masks']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    record(args.out) if args.mode == "record" else check(args.out)
