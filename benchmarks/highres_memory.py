"""Peak memory and speed of a tiled fit + predict on generated 4224x1056 images (MVTec AD 2 sheet-metal size).

Images are written as PNG files first, so decoding is measured as in real use. Run it once per training
set size: the scorers stream, so the peak should not grow with the number of training images.

    python benchmarks/highres_memory.py --backbone DIR --train 4 [--scorer knn] [--tile-size 448]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomalyvfm import AnomalyDetector
from anomalyvfm.demo import textured_image
from anomalyvfm.evaluation.evaluate import peak_rss_mb

HEIGHT, WIDTH = 1056, 4224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--train", type=int, default=4, help="training images")
    parser.add_argument("--scorer", default="mahalanobis")
    parser.add_argument("--tile-size", type=int, default=448)
    parser.add_argument("--tile-overlap", type=int, default=56)
    parser.add_argument("--tile-scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.train + 4):  # + 2 validation + 2 test
            paths.append(Path(tmp) / f"{i:03d}.png")
            Image.fromarray(textured_image(rng, HEIGHT, WIDTH)).save(paths[-1])
        train, validation, test = paths[: args.train], paths[args.train : args.train + 2], paths[args.train + 2 :]
        before = peak_rss_mb()
        detector = AnomalyDetector(backbone=args.backbone, scorer=args.scorer, tile_size=args.tile_size,
                                   tile_overlap=args.tile_overlap, tile_scale=args.tile_scale, batch_size=args.batch_size)
        start = time.perf_counter()
        detector.fit(train, validation, progress=False)
        fit_seconds, fit_peak = time.perf_counter() - start, peak_rss_mb()
        start = time.perf_counter()
        predictions = detector.predict(test, progress=False)
        predict_seconds = time.perf_counter() - start
    assert all(p.anomaly_map.shape == (HEIGHT, WIDTH) for p in predictions)
    print(json.dumps({"settings": vars(args), "image": f"{WIDTH}x{HEIGHT}", "summary": detector.config.summary(),
                      "fit_seconds": round(fit_seconds, 1), "seconds_per_test_image": round(predict_seconds / len(test), 2),
                      "peak_rss_mb_before_fit": round(before), "peak_rss_mb_after_fit": round(fit_peak),
                      "peak_rss_mb_after_predict": round(peak_rss_mb())}))


if __name__ == "__main__":
    main()
