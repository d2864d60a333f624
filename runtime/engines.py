"""Open the engine a user asked for, or pick one: native when it supports the model, else llama.cpp."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ripelm.models.errors import UnsupportedModelError
from ripelm.models.gguf_file import GGUFFile, open_gguf
from ripelm.runtime.backend import Backend
from ripelm.runtime.errors import BackendError

ENGINES = ("auto", "native", "llama.cpp")


def native_support_problem(g: GGUFFile) -> str | None:
    """Why the native engine cannot run this (valid) model, or None if it can."""
    from ripelm.runtime.loader import check_supported

    try:
        check_supported(g)
    except UnsupportedModelError as e:
        return str(e)
    return None


def open_backend(
    model_path: Path,
    *,
    engine: str = "auto",
    device: str | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    kv_memory: int | None = None,
    notice: Callable[[str], None] | None = None,
    speculate: str = "off",
    spec_k: int | None = None,
) -> Backend:
    """`kv_memory`: bytes for the native engine's paged KV pool (default: a share of free memory).
    `speculate="ngram"`: the native engine speculates with prompt lookup (up to `spec_k` tokens a step);
    llama.cpp cannot (an error when asked for by name, a notice when `auto` picked llama.cpp)."""
    if engine not in ENGINES:
        raise BackendError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    if engine == "llama.cpp" and speculate != "off":
        raise BackendError(f"--speculate {speculate} needs the native engine (drop --engine llama.cpp)")
    g = open_gguf(model_path)  # validated once here; the chosen engine reuses it
    if engine == "auto":
        problem = native_support_problem(g)
        if problem is None:
            engine = "native"
        else:
            try:
                backend = _llama_cpp(model_path, g, device, n_ctx, threads)
            except BackendError as e:
                raise UnsupportedModelError(f"{problem}; llama.cpp cannot run it either") from e
            if notice:
                off = "; decoding without speculation" if speculate != "off" else ""
                notice(f"using llama.cpp: {problem}{off}")
            return backend
    if engine == "native":
        from ripelm.runtime.device import set_threads
        from ripelm.runtime.engine_backend import EngineBackend

        set_threads(threads)
        extra = {} if spec_k is None else {"spec_k": spec_k}
        return EngineBackend(
            model_path, device=device, n_ctx=n_ctx, kv_memory=kv_memory, gguf=g, speculate=speculate, **extra
        )
    return _llama_cpp(model_path, g, device, n_ctx, threads)


def _llama_cpp(
    model_path: Path, g: GGUFFile, device: str | None, n_ctx: int | None, threads: int | None
) -> Backend:
    if device not in (None, "auto", "cpu"):
        raise BackendError("the llama.cpp engine here runs on the CPU; use --engine native for --device")
    from ripelm.runtime.llama_cpp_backend import LlamaCppBackend

    return LlamaCppBackend(model_path, n_ctx=n_ctx, n_threads=threads, gguf=g)
