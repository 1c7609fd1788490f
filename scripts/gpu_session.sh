#!/usr/bin/env bash
# The prepared script for a lent GPU (issues 18 and 19), one device call of about 8 minutes.
#   1. issue 19: one DQC step of NGswin x2 W4 at the paper batch (16 x 64x64 LR) on the card,
#      2DQuant and edge-sr, against the FP forward + backward (benchmarks.dqc_step --device cuda)
#   2. issue 19: the paper recipe (4000 iterations, batch 16 of 64x64, 16 held-out patches) for
#      NGswin x2 W4, the faithful 2DQuant and edge-sr side by side on the GPU, each cut at one
#      deadline (CalibrationConfig.time_limit), then scored on Set5/Set14 (benchmarks.dqc_budget)
#   3. issue 18: the CUDA backend's FP16/FP32 and W8A8/W4A4 (low-bit kernels) latency on the
#      320x180 and 1280x720 LR frames (runtime.backends.cuda.profile_cuda); the kernel library is
#      built at the start, beside step 1, on the host's CPUs
# Needs .gpu/data from `python scripts/gpu_accuracy_prep.py --sets Set5,Set14 --models
# NGswin_x2.pth` and carry: .gpu. At most 8 files come back: $OUT/summary.txt (the log),
# $OUT/results.tgz (every JSON and log, re-packed every 20 s, so a run cut short still returns
# what it finished).
# Usage (repo root): OUT=/tmp/out bash scripts/gpu_session.sh
#   BITS=2 PLAN=calib: only step 2, at another width (a second, shorter call: LIMIT=300).
#   SMOKE=1: a tiny CPU plan (SwinIR-light ref, a few iterations, no profile) to check the script.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_session}
PY=${PY:-python3}
LIMIT=${LIMIT:-500}  # seconds from the start to the end of everything
mkdir -p "$OUT" "$OUT/r"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 EDGE_SR_OFFLINE=1
export EDGE_SR_DATA=${EDGE_SR_DATA:-$PWD/.gpu/data} TQDM_MININTERVAL=10
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
START=$(date +%s)
left() { echo $(( LIMIT - $(date +%s) + START )); }
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
pack() { tar czf "$OUT/results.tgz.tmp" -C "$OUT" r 2>/dev/null && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }
run() {  # run NAME LIMIT CMD...: output to r/NAME.log, the exit status to the summary
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt 10 ] || { log "$name not started: ${limit}s left"; return 1; }
  timeout "$limit" "$@" >"$OUT/r/$name.log" 2>&1
  local rc=$?
  log "$name exit $rc"; tail -n 3 "$OUT/r/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  return $rc
}

BITS=${BITS:-4} PLAN=${PLAN:-all}
MODEL=ngswin-x2 DEV=cuda BATCH=16 PATCH=64 BUDGET=paper SETS=Set5,Set14 VAL=50 THREADS=6
if [ "${SMOKE:-0}" = 1 ]; then
  MODEL=swinir-light-x2-ref DEV=cpu BATCH=2 PATCH=16 BUDGET=cpu SETS=Set5 VAL=5 THREADS=1
  LIMIT=${LIMIT_SMOKE:-300}
fi
log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1); $(nproc) CPUs"
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version.split()[0])" 2>&1 | tee -a "$OUT/summary.txt"

# ---- kernels for step 3, on the host CPUs while step 1 uses the GPU ---------------------------
if [ "$DEV" = cuda ] && [ "$PLAN" = all ]; then
  ( CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    run kernels_build 240 nice -n 10 bash -c "cmake -S runtime/kernels -B build/kernels -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=${CC:-90} && cmake --build build/kernels -j6" \
      && run kernels_selftest 60 ./build/kernels/esr_lowbit_test ) &
fi

# ---- 1. the DQC step at the paper batch ------------------------------------------------------
for m in 2dquant edge-sr; do
  [ "$PLAN" = all ] || break
  run dqc_step_$m 60 $PY -m benchmarks.dqc_step --model $MODEL --batch $BATCH --lr-patch $PATCH \
    --method $m --device $DEV --threads $THREADS --steps 5 --warmup 2 --json "$OUT/r/dqc_step_$m.json"
done
pack

# ---- 2. the paper recipe, both methods side by side, one deadline ----------------------------
# DQC stops at the first step after TL minutes; scoring and step 3 get the time after it
RESERVE=150; [ "$PLAN" = all ] || RESERVE=60
TL=$($PY -c "print(round(max(0.5, ($(left) - $RESERVE) / 60), 2))")
log "calibrations: --time-limit $TL min each, side by side"
for m in 2dquant edge-sr; do
  run paper_w${BITS}_$m $(( $(left) - 40 )) $PY -m benchmarks.dqc_budget run --model $MODEL --bits $BITS \
    --method $m --budget $BUDGET --batch $BATCH --lr-patch $PATCH --iterations 4000 \
    --val-every $VAL --device $DEV --threads $THREADS --time-limit "$TL" --score $SETS \
    --out "$OUT/r" --tag "$BUDGET-$DEV" &
  sleep 1
done
while [ -n "$(jobs -rp | head -1)" ] && [ "$(left)" -gt 60 ]; do
  sleep 20; pack
done
wait
pack

# ---- 3. CUDA-backend latency on camera frames --------------------------------------------------
if [ "$DEV" = cuda ] && [ "$PLAN" = all ]; then
  run profile_cuda $(( $(left) - 5 )) $PY - "$OUT/r" <<'PYEOF'
import json, sys, torch
from edge_sr.models.ngswin import NGswin
from edge_sr.models.swinir import SwinIRLight
from runtime.backends.cuda import latency_student, profile_cuda
out, res = sys.argv[1], {}
for name, make in (("swinir-light-x2", lambda: SwinIRLight(2)), ("ngswin-x2", lambda: NGswin(2))):
    torch.manual_seed(0)
    fp = make().eval()  # random weights: latency does not depend on them
    students = {"w8a8": latency_student(fp, 8), "w4a4": latency_student(fp, 4)}
    for h, w in ((180, 320), (720, 1280)):
        key = f"{name} {w}x{h}"
        try:
            res[key] = profile_cuda(fp, students, input_size=(h, w), batch=1, runs=10, warmup=3)
        except Exception as e:  # record and go on
            res[key] = {"error": f"{type(e).__name__}: {e}"}
        json.dump({"note": "random weights, latency-only bounds; LR frame WxH; x2",
                   "rows": res}, open(f"{out}/profile_cuda.json", "w"), indent=2)
        for r in res[key] if isinstance(res[key], list) else [res[key]]:
            print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
PYEOF
fi
pack
$PY - "$OUT/r" <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt"
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    d = json.load(open(f))
    if "history" in d:
        print(f.split("/")[-1], "iterations", d["history"][-1]["iteration"], "stopped_at",
              d.get("dqc_stopped_at"), "val init/best", round(d["val_psnr_init"], 3),
              round(d["best_val_psnr"], 3), {k: round(v["psnr"], 3) for k, v in d.get("scores", {}).items()})
    elif "step_ms" in d:
        print(f.split("/")[-1], "step", round(d["step_ms"], 1), "ms; FP fwd+bwd",
              round(d["fp_fwd_bwd_ms"], 1), "ms; ratio", round(d["ratio"], 2), "peak MiB",
              round(d["peak_rss_mb"]))
PYEOF
log "done"
