#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow real-model checks included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick loop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -q --durations=12 "$@"
