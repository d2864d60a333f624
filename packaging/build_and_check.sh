#!/usr/bin/env bash
# Build ripelm's sdist and wheel from a fresh clone, check them, install the wheel with pipx into a
# throwaway location and make sure the installed `ripe` works:
#
#   bash packaging/build_and_check.sh
#
# Steps: git clone of HEAD (committed files only) -> python -m build -> twine check --strict -> look inside
# the wheel (all four packages, no tests, no model files) -> pipx install into a fresh PIPX_HOME and
# PIPX_BIN_DIR -> `ripe --version` -> `ripe run` with the bundled model -> `ripe models`.
#
# torch: pipx must not pull a multi-GB CUDA build where a CPU one will do, so the install is constrained
# to torch==$TORCH_VERSION (the CPU wheel comes from pip's find-links / TORCH_INDEX). llama-cpp-python:
# the wheel compiled by packaging/install.sh is reused from $RIPELM_WHEEL_CACHE when it is there (else
# pip compiles llama.cpp, about 5 minutes on 2 cores).
#
# Environment: PYTHON (default python3), TORCH_VERSION (default 2.13.0), TORCH_INDEX (e.g.
# https://download.pytorch.org/whl/cpu where no local CPU wheel is configured), RIPELM_WHEEL_CACHE
# (default ~/.cache/ripelm-wheels), KEEP=1 to keep the work folder.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ripelm-pkg.XXXXXX")
START=$(date +%s)

cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
step() { printf '\n== [%ss] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
fail() { echo "build_and_check: FAILED: $*" >&2; exit 1; }

step "fresh clone of $(git -C "$REPO" rev-parse --short HEAD) into $WORK/src"
git clone --quiet --no-hardlinks "$REPO" "$WORK/src"

step "tools (build, twine, pipx) in their own venv"
"$PYTHON" -m venv "$WORK/tools"
TOOLS="$WORK/tools/bin"
"$TOOLS/python" -m pip install --quiet --upgrade pip
"$TOOLS/python" -m pip install --quiet build twine pipx

step "python -m build (sdist + wheel)"
(cd "$WORK/src" && "$TOOLS/python" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1) \
  || { tail -30 "$WORK/build.log" >&2; fail "python -m build"; }
ls -l "$WORK/dist" >&2
WHEEL=$(ls "$WORK/dist"/ripelm-*.whl)
SDIST=$(ls "$WORK/dist"/ripelm-*.tar.gz)

step "twine check --strict"
"$TOOLS/twine" check --strict "$WHEEL" "$SDIST"

step "what the wheel holds"
"$TOOLS/python" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["ripelm/cli.py", "ripelm/runtime/engines.py", "ripelm/models/catalog.py", "ripelm/kernels/dequant.py"]
missing = [n for n in need if n not in names]
if not any(n.startswith("ripelm/kernels/_ripe_native") for n in names):
    missing.append("ripelm/kernels/_ripe_native*.so (the native CPU library)")
bad = [n for n in names if n.endswith(".gguf") or n.startswith("tests/") or "/tests/" in n]
if missing or bad:
    sys.exit(f"wheel content problem: missing {missing}, unexpected {bad}")
print(f"{len(names)} files; ripelm, ripelm.runtime, ripelm.models, ripelm.kernels and the native library present; no tests or models")
EOF

step "pipx install into a fresh PIPX_HOME"
export PIPX_HOME="$WORK/pipx/home" PIPX_BIN_DIR="$WORK/pipx/bin" PIPX_MAN_DIR="$WORK/pipx/man"
CONSTRAINTS="$WORK/constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
PIP_ARGS="--constraint $CONSTRAINTS"
LLAMA_CACHE=${RIPELM_WHEEL_CACHE:-$HOME/.cache/ripelm-wheels}
# only a wheel built for this CPU's flags (see install.sh)
LLAMA_KEY=$(python3 "$REPO/packaging/llama_cpp_flags.py" key)
LLAMA_WHEEL=$(ls "$LLAMA_CACHE"/llama-cpp-*-"$LLAMA_KEY"/llama_cpp_python-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$LLAMA_WHEEL" ]; then
  LLAMA_VERSION=$(basename "$LLAMA_WHEEL" | cut -d- -f2)
  echo "llama-cpp-python==$LLAMA_VERSION" >>"$CONSTRAINTS"
  PIP_ARGS="$PIP_ARGS --find-links $(dirname "$LLAMA_WHEEL")"
  echo "reusing $LLAMA_WHEEL" >&2
else
  echo "no cached llama-cpp-python wheel: pip compiles it (about 5 minutes)" >&2
fi
if [ -n "${TORCH_INDEX:-}" ]; then PIP_ARGS="$PIP_ARGS --extra-index-url $TORCH_INDEX"; fi
"$TOOLS/pipx" install --pip-args="$PIP_ARGS" "$WHEEL"
RIPE="$PIPX_BIN_DIR/ripe"
VENV_PY="$PIPX_HOME/venvs/ripelm/bin/python"
"$VENV_PY" - <<'EOF'
import importlib.metadata as md

import torch

cuda_pkgs = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].startswith("nvidia-"))
print(f"torch {torch.__version__} in the pipx venv; CUDA runtime packages: {cuda_pkgs or 'none'}")
if cuda_pkgs:
    raise SystemExit("pipx pulled CUDA packages for a CPU install")
EOF

step "the installed ripe"
export RIPELM_HOME="$WORK/home"  # never the real home
"$RIPE" --version
ANSWER=$("$RIPE" run --temp 0 --max-tokens 32 --stats "What is the capital of France? Answer in one sentence.")
echo "ripe run: $ANSWER"
case "$ANSWER" in
  *Paris*) ;;
  *) fail "ripe run did not answer with Paris" ;;
esac
"$RIPE" models

step "all checks passed in $(($(date +%s) - START)) s"
