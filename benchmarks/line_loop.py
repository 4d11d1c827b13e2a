"""Does the line loop pay off? Serve with a store, label the first half's verdicts, update, reload, score the rest.

    python benchmarks/line_loop.py --data ../shared/data --backbone DIR --out OUT [--categories all]

Per category, as a plant would run it (real `anomalyvfm serve --store`, `update` and `POST /admin/reload`):

1. `anomalyvfm fit` on train/good (thresholds from validation/good), timed — or the model already in
   OUT/CAT/model is used;
2. every test_public image, in one fixed order (a seeded shuffle of good and bad), is posted to the
   service; each verdict is recorded in a SQLite store with its image kept;
3. the first half's false alarms are labelled good and its detected defects labelled defect, from the
   test_public labels (standing in for an operator, who sees only what the model flagged);
4. `anomalyvfm update --store` writes a new version (timed), the service reloads it, and the second half
   is posted again: its verdicts under the parent (step 2) and under the update are compared.

`--drift blur:R` or `--drift noise:S` replays every image through a simulated camera change (Gaussian blur of
radius R px, or Gaussian noise of S grey levels): the parts are still good, but the appearance is new — the
case the loop is for, since a model whose validation images look like its test images has few false alarms
to learn from. Results then go to OUT/CAT-DRIFT/ and the row's category names the drift.

Test labels only *simulate the operator*: no setting or threshold is chosen from them, and the second half is
never labelled. Results: OUT/line_loop.json (one row per category) and OUT/line_loop.md (the table).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, wait_healthy  # noqa: E402

from anomalyvfm.data import list_images  # noqa: E402

CATEGORIES = ("magnetic_tile", "bottle", "kolektor", "ball_screw_drive")


def cli(*args: str) -> float:
    """Run one `anomalyvfm` command to completion; its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomalyvfm.cli.main", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def drifted(path: Path, drift: str | None) -> bytes:
    """The image's bytes as the camera sends them: unchanged, or through `--drift` (module docstring)."""
    if drift is None:
        return path.read_bytes()
    kind, amount = drift.split(":")
    image = Image.open(path).convert("RGB")
    if kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(float(amount)))
    else:
        noise = np.random.default_rng(abs(hash(path.name)) % 2**32).normal(0, float(amount), (image.height, image.width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, data: bytes, name: str) -> dict:
    response = requests.post(url + "/predict", files={"file": (name, data, "image/png")}, timeout=600)
    response.raise_for_status()
    return response.json()


def rates(verdicts: list[tuple[bool, bool]]) -> tuple[int, int, int, int]:
    """(false alarms, good images, defects flagged, defective images) of (is_defective, flagged) pairs."""
    good = [flagged for defective, flagged in verdicts if not defective]
    bad = [flagged for defective, flagged in verdicts if defective]
    return sum(good), len(good), sum(bad), len(bad)


def run_category(args: argparse.Namespace, category: str) -> dict:
    root, model = Path(args.data) / category / "test_public", Path(args.out) / category / "model"
    run_name = category + (f"-{args.drift.replace(':', '')}" if args.drift else "")
    out = Path(args.out) / run_name
    out.mkdir(parents=True, exist_ok=True)
    db = out / "results.db"
    fit_s = None
    if not (model / "config.json").is_file():
        fit_s = cli("fit", "--data", args.data, "--category", category, "--backbone", args.backbone, "--out", str(model))
    for stale in out.glob("results.db*"):
        stale.unlink()
    images = [(p, f"good/{p.name}", False) for p in list_images(root / "good")]
    images += [(p, f"bad/{p.name}", True) for p in list_images(root / "bad")]
    random.Random(args.seed).shuffle(images)
    first, second = images[: len(images) // 2], images[len(images) // 2:]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(out / "serve.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", str(model),
                                   "--port", str(port), "--store", str(db)], stdout=log, stderr=log)
    try:
        wait_healthy(url, server, 600)
        parent = {name: post(url, drifted(path, args.drift), name) for path, name, _ in images}
        records = requests.get(url + "/inspections", params={"limit": 1000}, timeout=60).json()["inspections"]
        ids = {r["source"]: r["id"] for r in records}
        labelled = 0
        for _, name, defective in first:
            if parent[name]["is_anomalous"]:  # the operator sees what was flagged and says what it is
                requests.post(f"{url}/inspections/{ids[name]}/label", timeout=60,
                              json={"label": "defect" if defective else "good", "by": "line_loop"}).raise_for_status()
                labelled += 1
        version = parent[first[0][1]]["model_version"]
        reload, update_s, updated = {"previous_version": version, "model_version": version}, None, parent
        if any(parent[name]["is_anomalous"] and not defective for _, name, defective in first):
            update_s = cli("update", "--model", str(model), "--store", str(db), "--out", str(out / "model-2"))
            reload = requests.post(url + "/admin/reload", json={"model": str(out / "model-2")}, timeout=600).json()
            updated = {name: post(url, drifted(path, args.drift), name) for path, name, _ in second}
        # (no false alarm in the first half: nothing to learn, the parent keeps judging)
    finally:
        server.terminate()
        server.wait(60)
    assert all(updated[name]["model_version"] == reload["model_version"] for _, name, _ in second)
    before = rates([(d, parent[name]["is_anomalous"]) for _, name, d in second])
    after = rates([(d, updated[name]["is_anomalous"]) for _, name, d in second])
    truth = [d for *_, d in second]
    first_fa = rates([(d, parent[name]["is_anomalous"]) for _, name, d in first])
    return {
        "category": run_name, "images": len(images), "second_half": len(second), "first_half_false_alarms": first_fa[0],
        "labelled": labelled, "false_alarms_before": before[0], "false_alarms_after": after[0], "good": before[1],
        "detected_before": before[2], "detected_after": after[2], "defective": before[3],
        "auroc_before": roc_auc_score(truth, [parent[name]["score"] for _, name, _ in second]),
        "auroc_after": roc_auc_score(truth, [updated[name]["score"] for _, name, _ in second]),
        "fit_s": fit_s, "update_s": update_s, "parent_version": reload["previous_version"],
        "model_version": reload["model_version"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| category | 1st-half false alarms labelled good | 2nd half: false alarms before → after (of good) | "
             "change | defects detected before → after (of defective) | change (pp) | image AUROC before → after | "
             "update s | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fa = (r["false_alarms_after"] - r["false_alarms_before"]) / r["false_alarms_before"] if r["false_alarms_before"] else 0.0
        pp = 100 * (r["detected_after"] - r["detected_before"]) / max(r["defective"], 1)
        fit = f"{r['fit_s']:.0f}" if r["fit_s"] else "–"
        update = "–" if r["update_s"] is None else f"{r['update_s']:.0f}"
        lines.append(f"| {r['category']} | {r['first_half_false_alarms']} | {r['false_alarms_before']} → "
                     f"{r['false_alarms_after']} ({r['good']}) | {100 * fa:+.0f} % | {r['detected_before']} → "
                     f"{r['detected_after']} ({r['defective']}) | {pp:+.1f} | {r['auroc_before']:.3f} → "
                     f"{r['auroc_after']:.3f} | {update} | {fit} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--categories", default="all", help="comma-separated, or all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed replay order")
    parser.add_argument("--drift", help="simulated camera change: blur:R (px) or noise:S (grey levels)")
    args = parser.parse_args()
    categories = CATEGORIES if args.categories == "all" else args.categories.split(",")
    rows_file = Path(args.out) / "line_loop.json"
    rows = [row for row in (json.loads(rows_file.read_text()) if rows_file.is_file() else [])
            if row["category"] not in [c + (f"-{args.drift.replace(':', '')}" if args.drift else "") for c in categories]]
    for category in categories:
        rows.append(run_category(args, category))
        rows_file.write_text(json.dumps(rows, indent=2) + "\n")
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    (Path(args.out) / "line_loop.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
