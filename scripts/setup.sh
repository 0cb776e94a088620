#!/usr/bin/env bash
# Creates .venv (if missing) and installs omnibal_pl with its C++ core, editable. Safe to rerun: a torch
# already in .venv is kept (to change it: .venv/bin/python -m pip uninstall -y torch, then rerun).
#
# torch==$OMNIBAL_TORCH_VERSION (default 2.13.0) comes from pip's configured indexes, or only from
# OMNIBAL_TORCH_INDEX when that is set (an index URL, passed as --index-url), on any machine:
#   - no NVIDIA GPU: a local "+cpu" build wins over the registry's CUDA one for the same version; where there
#     is none locally, point OMNIBAL_TORCH_INDEX at a CPU wheel index (e.g. https://download.pytorch.org/whl/cpu).
#   - NVIDIA GPU: the registry's default CUDA build, or the CUDA version you choose with PyTorch's per-CUDA
#     index https://download.pytorch.org/whl/cu<version> (pytorch.org's install selector lists those of a
#     release; pick one your driver supports: nvidia-smi shows the newest), e.g. for CUDA 12.8:
#       OMNIBAL_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
#     A torch without CUDA on a GPU machine is reported.
# Attention on GPUs: torch's own varlen attention (torch.nn.attention.varlen, torch >= 2.10) serves
# attention_backend=flash/auto without flash-attn. flash-attn (.[flash]) is optional: it compiles against the
# installed torch, so it needs nvcc from a CUDA toolkit matching torch.version.cuda, ninja, and no build
# isolation (its build imports torch); after this script, and again whenever torch changes (MAX_JOBS caps
# the parallel compiles, several GB of memory each):
#   .venv/bin/python -m pip install ninja packaging
#   MAX_JOBS=4 .venv/bin/python -m pip install --no-build-isolation -e ".[flash]"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${OMNIBAL_TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${TORCH_VERSION}" ${OMNIBAL_TORCH_INDEX:+--index-url "$OMNIBAL_TORCH_INDEX"}
fi
if has_nvidia_gpu && ! .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  echo "setup.sh: warning: this machine has an NVIDIA GPU but .venv's torch is a CPU build; uninstall it and" \
       "rerun with OMNIBAL_TORCH_INDEX set to a CUDA wheel index (see this script's header)" >&2
fi
pip install -q -e ".[dev]"
