"""benchmarks/defaults_study.py end to end on generated data: candidates, resume, the choice rule (through the
study's public functions), and the shortcut it rests on (smaller kNN banks as prefixes of one greedy coreset,
scored by the package's `prefix_knn_distances`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import load_benchmark

from anomalyvfm.demo import make_random_backbone
from anomalyvfm.scoring.coreset import greedy_coreset
from anomalyvfm.scoring import distances
from anomalyvfm.scoring.distances import knn_distance, prefix_knn_distances


@pytest.fixture(scope="module")
def study():
    return load_benchmark("defaults_study")


def test_greedy_coreset_is_prefix_consistent_and_prefix_search_matches_each_bank(monkeypatch):
    monkeypatch.setattr(distances, "CHUNK", 7)  # queries cross chunk boundaries
    x = torch.randn(400, 32)
    full = greedy_coreset(x, 40, seed=3)
    assert torch.equal(greedy_coreset(x, 10, seed=3), full[:10])  # a smaller ratio = the first rows
    bank = torch.nn.functional.normalize(x[full], dim=1).numpy()
    queries = np.random.default_rng(0).normal(size=(50, 32)).astype(np.float32)
    found = prefix_knn_distances(queries, bank, {0.01: 4, 0.03: 10, 0.1: 40})
    for ratio, rows in ((0.01, 4), (0.03, 10), (0.1, 40)):
        np.testing.assert_allclose(found[ratio], knn_distance(queries, bank[:rows]), atol=1e-6)


def test_study_writes_rows_resumes_and_chooses_by_its_rule(study, data_root, tmp_path, capsys):
    backbone = make_random_backbone(tmp_path / "deep", depth=9)  # the study's block sets reach block 9
    argv = ["--data", str(data_root), "--backbone", str(backbone), "--out", str(tmp_path / "out"),
            "--views", "56,84", "--tiles", ""]
    study.main(argv)
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    per_view = (len(study.BLOCK_SETS) * len(study.RATIOS) + len(study.MAHALANOBIS_BLOCK_SETS)) \
        * len(study.SIGMAS) * len(study.TOP_PERCENTS)
    assert len(rows) == 2 * per_view and {r["view"] for r in rows} == {"56", "84"}
    assert all(0 <= r[k] <= 1 for r in rows for k in ("val_image_auroc", "val_aupro_0.05", "image_auroc", "aupro_0.05"))
    chosen, means = study.choose(rows, ["demo"])
    best = max(f["rank"] for f in means.values())
    assert means[chosen]["rank"] >= best - study.TIE
    assert not any(means[k]["rank"] >= best - study.TIE and study.cost(k) < study.cost(chosen) for k in means)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "**chosen**" in table and json.loads(table.splitlines()[-1])["chosen"]["view"] == chosen[0]
    capsys.readouterr()
    study.main(argv)  # every (category, view) is done: nothing is rerun, no row is added
    assert "candidates," not in capsys.readouterr().out
    assert len((tmp_path / "out" / "rows.jsonl").read_text().splitlines()) == len(rows)
