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
# 2 cores). It is built for the instructions this CPU has (packaging/llama_cpp_flags.py: an x86 option
# the CPU lacks means "Illegal instruction"; AMX stays off, it segfaults in some VMs) and the wheel is
# kept under a key made of those flags, so it is reused only on CPUs that the same flags fit. The venv
# records the key of the build it holds: moved to a different CPU, it rebuilds.
KEY=$("$PY" packaging/llama_cpp_flags.py key)
[ -z "${CMAKE_ARGS:-}" ] || KEY="$KEY-custom-$(printf %s "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
STAMP="$VENV/.llama-cpp-build-key"
if ! "$PY" -c "import llama_cpp" 2>/dev/null || [ "$(cat "$STAMP" 2>/dev/null)" != "$KEY" ]; then
  CACHE=${RIPELM_WHEEL_CACHE:-$HOME/.cache/ripelm-wheels}/llama-cpp-$LLAMA_CPP_VERSION-$KEY
  WHEEL=$(ls "$CACHE"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$WHEEL" ]; then
    mkdir -p "$CACHE"
    FLAGS=$("$PY" packaging/llama_cpp_flags.py flags)
    echo "compiling llama-cpp-python $LLAMA_CPP_VERSION for this CPU (one time, about 5 minutes)..." >&2
    echo "  CMAKE_ARGS: ${CMAKE_ARGS:-$FLAGS}" >&2
    CMAKE_ARGS="${CMAKE_ARGS:-$FLAGS}" "$PY" -m pip wheel --quiet --no-deps --no-cache-dir \
      "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$CACHE.tmp"
    mv "$CACHE.tmp"/llama_cpp_python-*.whl "$CACHE"/ && rmdir "$CACHE.tmp"
    WHEEL=$(ls "$CACHE"/llama_cpp_python-*.whl | head -n1)
  fi
  "$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
  "$PY" -m pip install --quiet "$WHEEL"  # its dependencies
  echo "$KEY" >"$STAMP"
fi

"$PY" -m pip install --quiet -e '.[dev]'
# Bytecode for the checkout's modules, as pip writes it for an installed wheel: a Python run with
# PYTHONDONTWRITEBYTECODE set would otherwise compile them from source at every start (~0.1 s of `ripe chat`'s
# launch). Python checks each file against its source and ignores a stale one.
"$PY" -m compileall -q app runtime models kernels >/dev/null
"$VENV/bin/ripe" --version
