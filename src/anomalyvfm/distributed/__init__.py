"""Scale-out on Ray: batch `predict` over many images and `fit` on many good images across a cluster.

A front end on top of the detector (`--engine ray` on the command line): it uses `detector`, `data`,
`maps` and `evaluation`, and nothing below imports it. Ray is an optional extra (`pip install
'anomalyvfm[ray]'`), imported only when the Ray engine is used.

* `cluster` — join or start Ray, check every node can load the model;
* `sources` — folders, files and path lists (.txt/.csv/.parquet) → the image paths to score;
* `results` — the output folder: atomic Parquet parts, resume, the model's identity, predictions.csv;
* `predict` — Ray Data reads the paths, a pool of actors (model loaded once each) scores batches;
* `fit` — training features extracted in actors, the scorers' streaming states merged on the driver.
"""
