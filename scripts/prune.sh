#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default: prune the bundled
# SmolLM2-135M (50% per row, calibrated on Austen), save it to results/default/model (replaced
# on a rerun) with its report and per-layer plot, and print the report. Extra arguments go to
# `layerprune prune` (e.g. --solver sparsegpt --objective reconstruct --pattern nm:2:4); with
# your own --out the usual rule holds (an existing directory needs --force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
out=(--out results/default/model --force)
for a in "$@"; do
  case "$a" in --out|--out=*) out=() ;; esac
done
"$PY" -m layerprune prune --report results/default/report.json "${out[@]}" "$@"
