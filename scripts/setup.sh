#!/usr/bin/env bash
# Create .venv and install elite with its test tools. Idempotent; safe to rerun.
# torch is installed first and pinned: on these CPU machines `torch==2.13.0` is a CPU wheel on local
# disk, while an unpinned torch would pull a multi-GB CUDA build. On a GPU host set TORCH_SPEC
# (e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index of your choice in PIP_EXTRA_INDEX_URL)
# and ELITE_EXTRAS=onnx-gpu,flows,ray,train for the CUDA build of ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[dev,${ELITE_EXTRAS:-onnx,flows,ray,train}]"
