#!/usr/bin/env bash
# Set up ripelm on a Mac with Apple Silicon: torch (its macOS arm64 wheels include the MPS backend) and
# llama-cpp-python compiled with Metal, in a virtualenv in .venv, then ripelm from this checkout.
#
#   bash packaging/install_macos.sh         # then: .venv/bin/ripe run --device mps "Hello"
#
# Needs: macOS 13+ on arm64, Python 3.11+ (python.org or Homebrew, not the Xcode stub), the Xcode
# command line tools (xcode-select --install) and cmake (brew install cmake) for llama-cpp-python.
# UNTESTED: written from the torch and llama-cpp-python install docs; no Mac was available to run it.
#
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_VERSION (default 2.13.0),
# LLAMA_CPP_VERSION (default 0.3.36), DEV=1 also installs the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}

[ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ] || { echo "this recipe is for Apple Silicon Macs" >&2; exit 1; }
"$PYTHON" -c 'import platform, sys; assert platform.machine() == "arm64", "use an arm64 (not Rosetta) Python"; assert sys.version_info >= (3, 11)'

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install "torch==$TORCH_VERSION"
CMAKE_ARGS="-DGGML_METAL=on ${CMAKE_ARGS:-}" \
  "$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_VERSION"
printf 'torch==%s\nllama-cpp-python==%s\n' "$TORCH_VERSION" "$LLAMA_CPP_VERSION" >"$VENV/ripelm-constraints.txt"
"$PY" -m pip install --constraint "$VENV/ripelm-constraints.txt" -e ".${DEV:+[dev]}"

"$PY" - <<'PYEOF'
import torch

assert torch.backends.mps.is_available(), "torch does not see the Metal (MPS) device"
print(f"torch {torch.__version__}, MPS available")
import llama_cpp

print("llama.cpp GPU offload (Metal):", bool(llama_cpp.llama_supports_gpu_offload()))
PYEOF
"$VENV/bin/ripe" --version
