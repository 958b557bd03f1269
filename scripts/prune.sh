#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default: prune the bundled
# SmolLM2-135M (50% per row, calibrated on Austen) and print its report. Extra arguments go
# to `layerprune prune` (e.g. --solver sparsegpt --objective reconstruct --pattern nm:2:4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m layerprune prune --report results/default/report.json "$@"
