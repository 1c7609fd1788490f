#!/usr/bin/env bash
# PSNR of each deployable grid (issue 18; docs/results/grids.md): edge-sr, `fast` budget,
# calibrated then scored on Set5/Set14, one cell at a time; a cell already scored is skipped, so
# an interrupted run resumes. At 2-7 bits the trt grid is the ort grid
# (calibrate.prepare.quantizer_grid), so trt is calibrated at 8 bits only.
# Usage (repo root): bash scripts/grid_psnr.sh [OUT=results/grids]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/grids}
E=${E:-.venv/bin/edge-sr}
mkdir -p "$OUT"
for cell in "swinir-light-x2-ref 4 real" "swinir-light-x2-ref 4 ort" "ngswin-x2 4 real" "ngswin-x2 4 ort" \
            "swinir-light-x2-ref 8 ort" "swinir-light-x2-ref 8 real" "ngswin-x2 8 ort" "ngswin-x2 8 real" \
            "swinir-light-x2-ref 8 trt" "ngswin-x2 8 trt"; do
  set -- $cell; m=$1 b=$2 g=$3; f=$OUT/${m}_w${b}_${g}
  [ -s "$f.json" ] && continue
  t0=$(date +%s)
  [ -s "$f.pt" ] || $E calibrate --model "$m" --bits "$b" --method edge-sr --budget fast --grid "$g" -q -o "$f.pt" || continue
  t1=$(date +%s)
  $E eval --calibration "$f.pt" --datasets Set5,Set14 -q --json "$f.json"
  echo "$(date +%T) $m W$b $g calib $((t1-t0)) s eval $(( $(date +%s)-t1 )) s" >> "$OUT/log.txt"
done
