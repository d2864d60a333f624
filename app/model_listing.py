"""The chat models `ripe serve` offers at `GET /v1/models`: the model it was started with first (clients
such as `ripe run --engine openai` take the first id when they name none), then the other models it holds,
then every other model of the local store (`ripe models`) it could load on demand by name (model_pool.py).

OpenAI's listing has no model type nor load state, so each entry carries extra fields that OpenAI clients
ignore: `kind` ("chat", or "embedding" for the server's embedding model, which ripelm's own app leaves out
of its chat model picker), `loaded` (true for the models in memory now), and for the loaded ones their
context window under vLLM's name for it, `max_model_len` (a model not loaded yet has no window until it is
opened with the server's settings). A store model is listed when the server's engine can run it: not an
embedding model, and for the native engine one of its architectures (llama.cpp runs more). A server given a
fixed backend (tests, embedding) cannot load others and lists only what it holds.
"""

from __future__ import annotations

from typing import Any

from ripelm.models.config import SUPPORTED_ARCHITECTURES
from ripelm.models.errors import RipelmError


def servable(path: Any, engine: str) -> bool:
    """Whether a store model could be served for chat by an engine (GGUF header only, cached)."""
    from ripelm.ollama_models import model_info

    try:
        info = model_info(path)
    except (OSError, RipelmError, ValueError):
        return False  # a damaged or vanished file is left out, not a failed listing
    if "embedding" in info["capabilities"]:
        return False
    return engine == "llama.cpp" or info["details"]["family"] in SUPPORTED_ARCHITECTURES


def chat_models(api: Any) -> list[dict[str, Any]]:
    """The /v1/models entries (without `object`, `created`, `owned_by`) of the chat models, served first."""
    from ripelm.models.store import _canonical, list_models

    def loaded(name: str, backend: Any) -> dict[str, Any]:
        return {"id": name, "kind": "chat", "loaded": True, "max_model_len": backend.context_length}

    out, seen = [loaded(api.model_name, api.backend)], {_canonical(api.model_name)}
    pool = getattr(api, "pool", None)
    for m in pool.loaded() if pool is not None else []:
        if _canonical(m.name) not in seen:
            seen.add(_canonical(m.name))
            out.append(loaded(m.name, m.backend))
    if pool is None or pool.resolver is None:
        return out
    engine = api.backend.name
    for e in list_models():
        if _canonical(e.name) not in seen and servable(e.path, engine):
            seen.add(_canonical(e.name))
            out.append({"id": e.name, "kind": "chat", "loaded": False})
    return out
