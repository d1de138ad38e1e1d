#!/usr/bin/env bash
# Issue 13's full-budget ablation on QaTa-COV19 (valid split), 14 epochs per run. Two background queues, one torch
# thread each, niced so that interactive work on the same cores keeps priority. Each queue trains its runs one after
# the other, each a resumable `causalclipseg compare` run in $OUT/<arm>_seed<N>: run this script again (next session)
# and every queue continues where it stopped; finished runs are not retrained.
# The queues are ordered so that the comparisons that decide the shipped configuration are complete first:
# CausalCLIPSeg and the same model without the causal module (seeds 0, then 1), then the min-max game variants,
# then the U-Net baseline.
#   usage: scripts/ablation.sh                 start (or continue) both queues
#          scripts/ablation.sh table           the tables, once both queues have finished (compare --no-train:
#                                              refused, naming them, while any run has not finished)
#   logs:  $OUT/queue<N>.log
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/qata_cov19}
OUT=${OUT:-work_dirs/ablation}
PY=${PY:-.venv/bin/python}
QUEUES=("causalclipseg:0 causalclipseg:1 uninformative:0 unet:0"
        "no-causal:0 no-causal:1 public-masks:0 unet:1")
compare() {  # compare ARMS... -- SEEDS...: one `causalclipseg compare` with the shared settings
  local arms=() seeds=()
  while [ "$1" != "--" ]; do arms+=("$1"); shift; done
  shift
  seeds=("$@")
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 "$PY" -m causalclipseg.cli compare --data "$DATA" \
    --output-dir "$OUT" --epochs 14 --batch-size 16 --lr 1e-3 --no-progress --arms "${arms[@]}" --seeds "${seeds[@]}" ${TABULATE:+--no-train}
}
mkdir -p "$OUT"
if [ "${1:-}" = "table" ]; then
  TABULATE=1
  compare causalclipseg no-causal unet -- 0 1 && cp "$OUT/comparison.md" "$OUT/main_arms.md"
  compare causalclipseg uninformative public-masks -- 0 && cp "$OUT/comparison.md" "$OUT/game_arms.md"
  exit
fi
for index in "${!QUEUES[@]}"; do
  (
    for item in ${QUEUES[$index]}; do
      compare "${item%%:*}" -- "${item##*:}" || { echo "queue $index: ${item} failed" >&2; exit 1; }
    done
  ) >> "$OUT/queue$index.log" 2>&1 < /dev/null &
  echo "queue $index (${QUEUES[$index]}): pid $! -> $OUT/queue$index.log"
done
