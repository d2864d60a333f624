#!/usr/bin/env bash
# Tools the tests drive as a user would, that cannot share ripelm's virtualenv: oterm (an Ollama chat client
# for the terminal; its dependencies pin versions of pydantic and huggingface_hub that ripelm's do not
# allow), in .venv-oterm, where tests/test_oterm_tmux.py finds it. Run after packaging/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OTERM_VERSION=0.26.1
if [ ! -x .venv-oterm/bin/oterm ] || [ "$(.venv-oterm/bin/python -c 'import importlib.metadata as m; print(m.version("oterm"))' 2>/dev/null)" != "$OTERM_VERSION" ]; then
  "$PYTHON" -m venv .venv-oterm
  .venv-oterm/bin/python -m pip install --quiet --upgrade pip
  .venv-oterm/bin/python -m pip install --quiet "oterm==$OTERM_VERSION"
fi
