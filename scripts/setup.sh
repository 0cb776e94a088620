#!/usr/bin/env bash
# Creates .venv (if missing) and installs omnibal_pl with its C++ core, editable.
# torch: the CPU wheel where there is no NVIDIA GPU (nvidia-smi absent), the default CUDA build otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${OMNIBAL_TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "torch==${TORCH_VERSION}"
  else
    # A CPU wheel: a local "+cpu" build wins over the registry's CUDA one for the same version;
    # OMNIBAL_TORCH_INDEX can point at a CPU wheel index (e.g. PyTorch's /whl/cpu) where there is none locally.
    pip install -q "torch==${TORCH_VERSION}" ${OMNIBAL_TORCH_INDEX:+--index-url "$OMNIBAL_TORCH_INDEX"}
  fi
fi
pip install -q -e ".[dev]"
