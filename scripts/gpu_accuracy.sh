#!/usr/bin/env bash
# Accuracy cells on a lent GPU (issues 3 and 7), inside one device call of about 9 minutes.
#   - NGswin x2/x3, Set5/Set14: FP, MinMax, Percentile, DOBI, 2DQuant (fast) at 4/3/2 bits
#   - 2DQuant with the paper recipe (4000 it, batch 16, 64x64): NGswin x2 and SwinIR-light x4 at
#     W4 and W2
# Several workers of `benchmarks.accuracy --device cuda` share one results folder per family;
# cells and calibrations are claimed, so none runs twice. Cells already here (carried) are skipped.
# Needs .gpu/data from scripts/gpu_accuracy_prep.py, and carry: .gpu results/accuracy_ngswin
# results/accuracy. Everything new comes back as $OUT/results.tgz (re-packed every 30 s, so a
# run cut short still returns what it finished) with the logs; $OUT/summary.txt lists the cells.
# Usage (repo root): OUT=/tmp/out bash scripts/gpu_accuracy.sh
#   PLAN=wide: score existing calibrations on B100 only (prep with --sets B100 --no-pool).
#   SMOKE=1: a tiny CPU plan into /tmp folders, to check this script without a GPU.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_accuracy}
PY=${PY:-python3}
LIMIT=${LIMIT:-500}           # seconds the workers may run
mkdir -p "$OUT" "$OUT/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 EDGE_SR_OFFLINE=1
export EDGE_SR_DATA=${EDGE_SR_DATA:-$PWD/.gpu/data} TQDM_MININTERVAL=10
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
START=$(date +%s)
touch "$OUT/.start"
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

NG=results/accuracy_ngswin SW=results/accuracy DEV=cuda
if [ "${SMOKE:-0}" = 1 ]; then
  NG=/tmp/smoke_ng SW=/tmp/smoke_sw DEV=cpu LIMIT=${LIMIT_SMOKE:-240}
  mkdir -p $NG $SW; cp -n results/accuracy_ngswin/x2_stats.pt $NG/; cp -n results/accuracy/x4_stats.pt $SW/
fi

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version.split()[0])" 2>&1 | tee -a "$OUT/summary.txt"
# the staged pool: every image calibration reads must be a real file
[ -s "$EDGE_SR_DATA/used.txt" ] && while read -r f; do [ -s "$EDGE_SR_DATA/train/BSD200/$f" ] || log "MISSING pool image $f"; done < "$EDGE_SR_DATA/used.txt"
[ -s "$EDGE_SR_DATA/used.txt" ] && $PY - <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt"
# the split seen here must be the one the prep script staged for
import os
from pathlib import Path
from calibrate.api import pool_data
import scripts.gpu_accuracy_prep as prep
root = Path(os.environ["EDGE_SR_DATA"])
used = {p.name for p in prep.used_pool_images(root / "train" / "BSD200")}
staged = set((root / "used.txt").read_text().split())
print("pool split check:", "ok" if used == staged else f"DIFFERS {sorted(used ^ staged)[:5]}")
PYEOF

worker() {  # worker NAME ARGS...: one benchmarks.accuracy process until the common deadline
  local name=$1 left=$(( LIMIT - $(date +%s) + START )); shift
  [ "$left" -gt 20 ] || { log "worker $name not started: ${left}s left"; return; }
  timeout "$left" $PY -m benchmarks.accuracy --device $DEV "$@" >"$OUT/logs/$name.log" 2>&1
  log "worker $name exit $?"
}
pack() {  # everything new since the start, atomically
  find $NG $SW -newer "$OUT/.start" -type f \( -name '*.json' -o -name '*.pt' -o -name '*.md' \) \
    ! -name '*.claim' 2>/dev/null >"$OUT/.list"
  tar czf "$OUT/results.tgz.tmp" -T "$OUT/.list" "$OUT/logs" 2>/dev/null && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

if [ "${PLAN:-grid}" = wide ]; then
  # second call: score existing calibrations on B100 (carry .gpu with --sets B100 --no-pool)
  for i in 1 2; do
    worker ngwide$i --family ngswin --scales 3,2 --bits 4,2 --datasets B100 --threads 3 &
    sleep 1
  done
  worker swwide --family swinir --scales 4 --bits 4,2 --datasets B100 --threads 3 &
elif [ "${SMOKE:-0}" = 1 ]; then
  worker g1 --family ngswin --out $NG --scales 2 --bits 4 --datasets Set5 --methods minmax,dobi --threads 1 &
  worker g2 --family ngswin --out $NG --scales 2 --bits 4 --datasets Set5 --methods minmax,dobi --threads 1 &
else
  # beside the cells, low priority: build the low-bit CUDA kernels for this GPU and run their
  # self-test (scripts/gpu_check.sh step 2; no timing, the GPU is shared with the workers)
  ( CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    nice -n 10 timeout 240 bash -c "cmake -S runtime/kernels -B build/kernels -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=${CC:-90} && cmake --build build/kernels -j4" >"$OUT/logs/kernels_build.log" 2>&1 \
      && timeout 60 ./build/kernels/esr_lowbit_test >"$OUT/logs/kernels_selftest.log" 2>&1
    log "kernels (sm_$CC): build + self-test exit $?" ) &
  # CPU/GPU agreement: NGswin x2 FP and DOBI W4 (the CPU run's bounds) on Set5, into /tmp
  XC=/tmp/xcheck_ng; mkdir -p $XC/calib; cp results/accuracy_ngswin/x2_stats.pt $XC/
  cp results/accuracy_ngswin/calib/x2_w4_dobi.pt $XC/calib/
  worker xcheck --family ngswin --out $XC --scales 2 --bits 4 --methods dobi --datasets Set5 --threads 2 &
  NG="$NG $XC"
  # two workers per group: the paper-recipe groups run their W4 and W2 calibrations side by side
  for i in 1 2; do
    worker ngpaper$i --family ngswin --scales 2 --bits 4,2 --methods 2dquant-paper --datasets Set5,Set14 --threads 2 &
    sleep 1
    worker swpaper$i --family swinir --scales 4 --bits 4,2 --methods 2dquant-paper --datasets Set5,Set14 --threads 2 &
    sleep 1
    { worker grid$i --family ngswin --threads 3 --datasets Set5,Set14
      worker wide$i --family ngswin --threads 3 --datasets Set5,Set14 --methods 2dquant-a8fc1; } &
    sleep 1
  done
fi

while [ -n "$(jobs -r)" ]; do
  sleep 30; pack
  log "cells so far: $(wc -l <"$OUT/.list"); $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
done
wait
pack
for f in $(grep '\.json$' "$OUT/.list"); do
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], round(d['psnr'],3) if 'psnr' in d else '', round(d.get('eval_seconds',0)), d.get('calibration',{}).get('dqc_seconds',''))" "$f" 2>/dev/null
done | tee -a "$OUT/summary.txt"
log "done"
