#!/usr/bin/env bash
# Frame-shaped engines side by side (issue 18; docs/results/grids.md): build each engine at a
# 320x180 LR frame, then `edge-sr profile --compare` at 2 threads and 1 thread. Latency does not
# depend on the bound values, so DOBI-only calibrations stand in for trained ones (same graph).
# Every other `edge-sr` job is stopped (SIGSTOP) while profiling and continued afterwards; the CPU
# model and the date go to $OUT/cpu.txt.
# Usage (repo root): [OUT=results/speed] [DIR=engines/speed] [SPECS="model bits grid;..."]
#   bash scripts/frame_speed.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/speed}
DIR=${DIR:-engines/speed}
E=${E:-.venv/bin/edge-sr}
SPECS=${SPECS:-"swinir-light-x2-ref 8 ort;swinir-light-x2-ref 4 ort;swinir-light-x2-ref 4 real;ngswin-x2 8 ort;ngswin-x2 4 ort"}
mkdir -p "$OUT"
engines=()
IFS=';' read -ra specs <<< "$SPECS"
for spec in "${specs[@]}"; do
  set -- $spec; out=$DIR/${1}_w${2}_${3}_dobi
  [ -s "$out/manifest.json" ] || $E build --model "$1" --scale 2 --bits "$2" --grid "$3" --method dobi \
    --budget fast --input-size 320x180 --backend ort -q --force --out "$out" || continue
  engines+=("$out")
done
PIDS=$(pgrep -f "edge-sr (calibrate|eval|build)" | tr '\n' ' ')
[ -n "$PIDS" ] && kill -STOP $PIDS
trap '[ -n "$PIDS" ] && kill -CONT $PIDS' EXIT
{ lscpu | grep "Model name"; date -u +"%F %T UTC"; } > "$OUT/cpu.txt"
for e in "${engines[@]}"; do
  for t in 2 1; do
    $E profile --engine "$e" --input-size 320x180 --compare --threads $t -q \
      --json "$OUT/$(basename "$e")_t$t.json"
  done
done
