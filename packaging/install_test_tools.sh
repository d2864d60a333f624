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

# Real chat templates of the catalog's model families (Qwen2.5, Qwen3, Llama 3.x, Mistral, a DeepSeek-R1
# distill), for the tool-call and reasoning tests: llama.cpp keeps them in its source tree, which the
# llama-cpp-python sdist vendors (Hugging Face itself is not reachable from CI). Extracted into
# tests/data/chat_templates (gitignored); tests/test_tool_calls.py skips, saying why, without them.
TEMPLATES=(Qwen-Qwen2.5-7B-Instruct Qwen-Qwen3-0.6B meta-llama-Llama-3.1-8B-Instruct
  meta-llama-Llama-3.2-3B-Instruct mistralai-Mistral-Nemo-Instruct-2407 Mistral-Small-3.2-24B-Instruct-2506
  deepseek-ai-DeepSeek-R1-Distill-Qwen-32B)
DEST=tests/data/chat_templates
if [ ! -f "$DEST/${TEMPLATES[-1]}.jinja" ]; then
  VENV_PY=${VENV_PY:-.venv/bin/python}
  LLAMA_VERSION=$("$VENV_PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
  TMP=$(mktemp -d)
  "$VENV_PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$TMP"
  mkdir -p "$DEST"
  tar xzf "$TMP"/llama_cpp_python-*.tar.gz -C "$TMP" --wildcards '*/vendor/llama.cpp/models/templates/*.jinja'
  for t in "${TEMPLATES[@]}"; do cp "$TMP"/llama_cpp_python-*/vendor/llama.cpp/models/templates/"$t".jinja "$DEST/"; done
  rm -rf "$TMP"
fi

# instructor (structured extraction from an OpenAI-compatible server), for tests/test_serve_clients.py: its
# pins (rich < 15, jiter < 0.15) conflict with versions ripelm's environment has, so it gets its own venv.
INSTRUCTOR_VERSION=1.17.0
if [ ! -x .venv-instructor/bin/python ] || [ "$(.venv-instructor/bin/python -c 'import importlib.metadata as m; print(m.version("instructor"))' 2>/dev/null)" != "$INSTRUCTOR_VERSION" ]; then
  "$PYTHON" -m venv .venv-instructor
  .venv-instructor/bin/python -m pip install --quiet "instructor==$INSTRUCTOR_VERSION"
fi
