#!/usr/bin/env bash
# Run cells of issue 19's NGswin table: one calibration + one Set5/Set14 evaluation per cell,
# one thread each, so that two lanes can run side by side on a 2-core machine.
#
#   [BUDGET=fast] scripts/table_cells.sh OUTDIR "MODEL BITS METHOD [EXTRA CALIBRATE OPTIONS...]" ...
#
# BUDGET is the DQC budget (default cpu, the NGswin table's; the SwinIR-light reference rows use
# fast).
# Each cell writes OUTDIR/<model>_w<bits>_<tag>.{pt,json,calib.log,eval.log}; <tag> is METHOD,
# with "_rot" appended when the options contain --rotate auto and "_kept-X" for --fp-weights X. A cell whose .json exists is
# skipped, and `edge-sr calibrate --resume` picks an interrupted calibration up.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
export OMP_NUM_THREADS=1
for cell in "$@"; do
  read -r model bits method extra <<<"$cell"
  tag=$method
  [[ "$extra" == *"--rotate auto"* ]] && tag="${tag}_rot"
  [[ "$extra" =~ --fp-weights\ ([a-z0-9]+) ]] && tag="${tag}_kept-${BASH_REMATCH[1]}"
  name="${model}_w${bits}_${tag}"
  [[ -f "$out/$name.json" ]] && { echo "skip $name"; continue; }
  echo "$(date -u +%FT%TZ) start $name" >>"$out/log.txt"
  # shellcheck disable=SC2086
  edge-sr calibrate --model "$model" --bits "$bits" --method "$method" --budget "${BUDGET:-cpu}" \
      $extra --resume -o "$out/$name.pt" >"$out/$name.calib.log" 2>&1
  edge-sr eval --calibration "$out/$name.pt" --datasets Set5,Set14 --threads 1 \
      --json "$out/$name.json" >"$out/$name.eval.log" 2>&1
  echo "$(date -u +%FT%TZ) done $name" >>"$out/log.txt"
done
