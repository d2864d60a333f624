#!/usr/bin/env bash
# Set up ripelm on Linux with an NVIDIA GPU: a virtualenv in .venv with a CUDA build of torch and
# llama-cpp-python compiled with CUDA (GGML_CUDA), then ripelm itself from this checkout.
#
#   bash packaging/install_cuda.sh          # then: .venv/bin/ripe run --device cuda "Hello"
#
# Needs: an NVIDIA driver (nvidia-smi works), Python 3.11+, and for llama-cpp-python the CUDA toolkit
# (nvcc) plus cmake and a C++ compiler; the build takes several minutes.
# This script itself is UNTESTED: written from the torch and llama-cpp-python install docs; no CUDA machine
# with network access was available. The CUDA path of ripelm (graphs, Triton attention) was run on an
# H200 with that machine's own torch 2.11 + Triton 3.6 (README, "On a GPU").
#
# Environment: PYTHON (default python3), VENV (default .venv), CUDA_TAG (torch wheel index, default
# cu126: pick the newest your driver supports, see https://pytorch.org/get-started/locally/),
# TORCH_VERSION (default 2.13.0), LLAMA_CPP_VERSION (default 0.3.36), DEV=1 also installs the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CUDA_TAG=${CUDA_TAG:-cu126}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: install the NVIDIA driver first" >&2; exit 1; }
command -v nvcc >/dev/null || echo "warning: nvcc not found; llama-cpp-python's CUDA build needs the CUDA toolkit" >&2

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# torch's CUDA wheels live on its own index; pinning the version keeps pip from swapping it later.
"$PY" -m pip install "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$CUDA_TAG"

# llama.cpp with its CUDA backend. --no-binary forces a source build even where a CPU wheel exists.
CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" FORCE_CMAKE=1 \
  "$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION"

# ripelm; the constraint keeps the CUDA torch and the CUDA llama.cpp build in place.
printf 'torch==%s\nllama-cpp-python==%s\n' "$TORCH_VERSION" "$LLAMA_CPP_VERSION" >"$VENV/ripelm-constraints.txt"
"$PY" -m pip install --constraint "$VENV/ripelm-constraints.txt" -e ".${DEV:+[dev]}"

"$PY" - <<'PYEOF'
import torch

assert torch.cuda.is_available(), "torch does not see a CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0)}")
import llama_cpp

print("llama.cpp GPU offload:", bool(llama_cpp.llama_supports_gpu_offload()))
PYEOF
"$VENV/bin/ripe" --version
