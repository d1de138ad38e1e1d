#!/usr/bin/env bash
# Issue 13's full-budget ablation on QaTa-COV19 (valid split): one background `causalclipseg compare` per seed,
# one torch thread each, niced so that interactive work on the same cores keeps priority. Each arm is a resumable
# training run in work_dirs/ablation/<arm>_seed<N>: run this script again (next session) and it continues.
#   usage: scripts/ablation.sh [SEED ...]          (default: 0 1)
#   logs:  work_dirs/ablation/seed<N>.log
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/qata_cov19}
OUT=${OUT:-work_dirs/ablation}
ARMS=${ARMS:-causalclipseg no-causal unet uninformative public-masks}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for seed in "${@:-0 1}"; do
  for s in $seed; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup nice -n 10 "$PY" -m causalclipseg.cli compare --data "$DATA" \
      --output-dir "$OUT" --epochs 14 --batch-size 16 --lr 1e-3 --no-progress --arms $ARMS --seeds "$s" \
      >> "$OUT/seed$s.log" 2>&1 &
    echo "seed $s: pid $! -> $OUT/seed$s.log"
  done
done
