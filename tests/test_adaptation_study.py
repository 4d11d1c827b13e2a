"""benchmarks/adaptation_study.py end to end on the generated demo data: rows, resume, table."""
from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("adaptation_study")


def test_study_writes_rows_resumes_and_tabulates(study, backbone_dir, data_root, tmp_path, one_thread, capsys):
    argv = ["--data", str(data_root), "--backbone", str(backbone_dir), "--out", str(tmp_path), "--image-size", "112",
            "--max-train-images", "6", "--categories", "demo", "--seeds", "0", "--variants", "frozen,lora-compact,lora-heads",
            "--lora-steps", "2"]
    assert study.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["mode"]) for r in rows] == [
        ("frozen", "distance"), ("lora-compact", "distance"), ("lora-heads", "distance"), ("lora-heads", "head")]
    compact = rows[1]
    assert compact["adapter_bytes"] > 0 and rows[0]["adapter_bytes"] == 0
    assert 0 <= compact["held_out_frozen"] <= compact["held_out_kept"] == compact["selection_score"] <= 2
    assert all(0 <= r["image_auroc"] <= 1 and r["fit_seconds"] > 0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| lora-compact | distance | demo |" in table and "Δ image AUROC" in table
    assert not (tmp_path / "runs" / "frozen" / "demo" / "seed0" / "model").exists()  # models are not kept
    # a rerun finds every row done and fits nothing
    capsys.readouterr()
    assert study.main(argv) == 0
    assert "image AUROC" not in capsys.readouterr().out.split("| variant")[0]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 4


def test_study_refuses_unknown_variants(study, tmp_path):
    with pytest.raises(SystemExit):
        study.main(["--data", str(tmp_path), "--backbone", "x", "--out", str(tmp_path / "o"), "--variants", "nope"])
