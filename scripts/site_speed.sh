#!/usr/bin/env bash
# Issue 18 item 3: per-site speed and PSNR at the 320x180 frame, 2 threads (benchmarks.site_speed).
# Run on an otherwise idle machine; writes results/site_speed/*.json and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export EDGE_SR_DATA=${EDGE_SR_DATA:-../shared/data}
lscpu | grep "Model name"
for spec in "swinir-light-x2-ref 8" "ngswin-x2 8" "ngswin-x2 4" "swinir-light-x2-ref 4"; do
  set -- $spec
  $PY -m benchmarks.site_speed --model "$1" --bits "$2" --threads 2 --runs 7 --also qk+pv \
    --out "results/site_speed/${1}_w$2.json" 2>&1 | grep -v "^exported\|Warn"
done
