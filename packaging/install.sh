#!/usr/bin/env bash
# Set up ripelm from a checkout on a CPU Linux machine: a virtualenv in .venv with the CPU build of torch,
# llama-cpp-python compiled for this CPU, and ripelm itself (editable) with its test tools.
#
#   bash packaging/install.sh          # then: .venv/bin/ripe chat
#
# Environment: PYTHON (default python3), VENV (default .venv), RIPELM_WHEEL_CACHE (where the compiled
# llama-cpp-python wheel is kept between runs, default ~/.cache/ripelm-wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_CPP_VERSION=0.3.36
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# torch first, pinned: an open `torch` requirement would pull a multi-GB CUDA build where a CPU build is
# on hand. Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU build.
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple}

# llama-cpp-python has no wheel for this platform on PyPI, so pip compiles llama.cpp (about 5 minutes on
# 2 cores). Build it once with explicit x86 flags and keep the wheel: llama.cpp's AMX matmul (picked by
# -march=native on Sapphire Rapids) segfaults in some VMs, so AMX is off and AVX-512 is on.
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  CACHE=${RIPELM_WHEEL_CACHE:-$HOME/.cache/ripelm-wheels}/llama-cpp-$LLAMA_CPP_VERSION
  WHEEL=$(ls "$CACHE"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$WHEEL" ]; then
    mkdir -p "$CACHE"
    ARCH=$(uname -m)
    if [ "$ARCH" = "x86_64" ]; then
      FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
      if grep -q avx512f /proc/cpuinfo 2>/dev/null; then
        FLAGS="$FLAGS -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
      fi
      FLAGS="$FLAGS -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    else
      FLAGS=""
    fi
    echo "compiling llama-cpp-python $LLAMA_CPP_VERSION (one time, about 5 minutes)..." >&2
    CMAKE_ARGS="${CMAKE_ARGS:-$FLAGS}" "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
      "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$CACHE"
    WHEEL=$(ls "$CACHE"/llama_cpp_python-*.whl | head -n1)
  fi
  "$PY" -m pip install --quiet "$WHEEL"
fi

"$PY" -m pip install --quiet -e '.[dev]'
"$VENV/bin/ripe" --version
