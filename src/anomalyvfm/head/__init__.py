"""The scoring head: everything after the backbone, in numpy, shared by every way of computing features.

`AnomalyDetector` (torch features) and the exported runtime (OpenVINO / ONNX features) hand the head each
view's `(h, w, C)` patch features; the head scores them against the fitted state (kNN bank or Gaussian per
view, foreground direction, training images' global embeddings), fuses views, suppresses background, adds
image evidence, builds the map and decides with the calibration's thresholds. Written once, so an option
after the backbone is a change here plus its setting, and an exported model scores with exactly the code
the model was validated with.

* `calibration` — thresholds and the statistics learnt from validation images (typed, JSON-ready);
* `scores` — per-image score records and the view / score-mode arithmetic;
* `search` — nearest-neighbour backends for the kNN distance step (numpy, torch on a GPU, OpenVINO);
* `head` — `ScoringHead`, the object both predictors call.
"""
