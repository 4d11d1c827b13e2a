#!/usr/bin/env bash
# LoRA ablation on one MVTec AD 2 category: frozen features vs LoRA (confidence-weighted and plain BCE
# loss), each LoRA model trained ONCE and evaluated in all three score modes (evaluate --score).
# Every choice (thresholds, early stopping, fusion statistics) comes from train/validation; test_public
# is only reported. Each heavy command holds $LOCK so runs on a shared machine are serialised.
#
#   benchmarks/lora_ablation.sh [OUT]          env: DATA CATEGORY BACKBONE MAX_TRAIN LOCK EXTRA_FIT CROP448 SEEDS
#
# Writes OUT/<variant>/{model,fit.log,fit.err,eval_<mode>/metrics.json} and OUT/table.md. Finished stages
# are skipped, so an interrupted run can be restarted. Variants without a seed suffix use seed 0.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-lora_ablation}
DATA=${DATA:-$REPO/../shared/data}  # defaults relative to the checkout, not one machine
CATEGORY=${CATEGORY:-magnetic_tile}
BACKBONE=${BACKBONE:-$REPO/../models/dinov2-vits14}  # get_dinov2_small.sh DIR
MAX_TRAIN=${MAX_TRAIN:-140}
LOCK=${LOCK:-${TMPDIR:-/tmp}/anomalyvfm-cpu.lock}
export PYTHONPATH="$REPO/src"  # this checkout, not whatever anomalyvfm is installed
CLI=(python -m anomalyvfm.cli.main)

locked() { flock "$LOCK" /usr/bin/time -v "$@"; }

fit() {  # fit NAME [fit options…]
  local name=$1; shift
  mkdir -p "$OUT/$name"
  [[ -f "$OUT/$name/model/config.json" ]] && return 0  # resumable: a finished fit is kept
  locked "${CLI[@]}" fit --data "$DATA" --category "$CATEGORY" --backbone "$BACKBONE" --max-train-images "$MAX_TRAIN" \
    --out "$OUT/$name/model" ${EXTRA_FIT:-} "$@" > "$OUT/$name/fit.log" 2> "$OUT/$name/fit.err"
}

evaluate() {  # evaluate NAME MODE
  local name=$1 mode=$2
  [[ -f "$OUT/$name/eval_$mode/metrics.json" ]] && return 0
  locked "${CLI[@]}" evaluate --model "$OUT/$name/model" --data "$DATA" --category "$CATEGORY" --score "$mode" \
    --out "$OUT/$name/eval_$mode" > "$OUT/$name/eval_$mode.log" 2> "$OUT/$name/eval_$mode.err"
}

fit frozen
evaluate frozen distance
for loss in confidence bce; do
  fit "lora_$loss" --lora --loss "$loss"
  for mode in distance head fusion; do evaluate "lora_$loss" "$mode"; done
done
# Crops of the full short side (448 px square) instead of 224 px: more context per step, ~4x the cost
# (CROP448=0 skips it).
if [[ ${CROP448:-1} == 1 ]]; then
  fit lora_confidence_crop448 --lora --loss confidence --lora-image-size 0
  for mode in distance head fusion; do evaluate lora_confidence_crop448 "$mode"; done
fi
# Seed spread of the distance mode: one training run per seed is all that separates the two losses above.
for seed in ${SEEDS-1 2}; do  # SEEDS="" skips the spread
  for loss in confidence bce; do
    fit "lora_${loss}_seed$seed" --lora --loss "$loss" --seed "$seed"
    evaluate "lora_${loss}_seed$seed" distance
  done
done

python - "$OUT" > "$OUT/table.md" <<'EOF'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| variant | score | image AUROC | AU-PRO(0.05) | SegF1 | fit s (wall, /usr/bin/time) | LoRA steps (best) |")
print("|---|---|---|---|---|---|---|")
variants = [v for v in ("frozen", "lora_confidence", "lora_bce", "lora_confidence_crop448") if (out / v / "model").is_dir()]
variants += sorted(p.name for p in out.glob("lora_*_seed*"))
for variant in variants:
    err = (out / variant / "fit.err").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    config = json.loads((out / variant / "model" / "config.json").read_text())
    record = config.get("lora_record") or {}
    steps = f"{record['steps_run']} ({record['best_step']})" if record else "-"
    for mode in ("distance", "head", "fusion"):
        path = out / variant / f"eval_{mode}" / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            print(f"| {variant} | {mode} | {m['image_auroc']:.4f} | {m['aupro_0.05']:.4f} | {m['seg_f1']:.4f} "
                  f"| {seconds:.0f} | {steps} |")
EOF
cat "$OUT/table.md"
