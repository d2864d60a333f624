"""Tiny models with a small vocabulary (for distribution tests) and loading helpers for speculative tests.

`small_vocab_source` writes a GGUF holding only tokenizer metadata for `n` tokens; `build_tiny_model`
copies it (``vocab_from=``) so the model's embedding and head have `n` rows. llama.cpp cannot build a
tokenizer from such a list, so these models are opened with another model's `Tokenizer` (generation works
on token ids and never needs to encode text).
"""

from __future__ import annotations

from pathlib import Path

import gguf
from native_reference import NativeBackend

from ripelm.runtime.tokenizer import Tokenizer


def small_vocab_source(path: Path, n: int) -> Path:
    if path.is_file():
        return path
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n)])
    w.add_token_types([1] * n)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def open_native(path: Path, tokenizer: Tokenizer, n_ctx: int = 256) -> NativeBackend:
    return NativeBackend(path, device="cpu", n_ctx=n_ctx, tokenizer=tokenizer)


def reset(*backends: NativeBackend) -> None:
    """Empty the caches, so that every run computes its prompt the same way (same rows per forward)."""
    for b in backends:
        b.cache.truncate(0)
        b.cached_tokens.clear()
