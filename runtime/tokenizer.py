"""Tokenizer: text <-> token ids for a GGUF model, and the streaming detokenizer.

This module owns tokenization. It uses llama.cpp's tokenizer (through llama-cpp-python, loading the GGUF's
vocabulary only: no weights), so every pre-tokenizer and vocabulary type llama.cpp supports works here, and
the ids match what llama.cpp would feed its own model. It also owns the end-of-generation ids (llama.cpp's
``is_eog``) and :class:`StreamDecoder`, which turns a stream of ids into text that is safe to print.

llama.cpp logs through one process-wide callback; :func:`quiet_llama_logs` points it at a no-op so loading
never prints to the terminal (failures still surface as exceptions).
"""

from __future__ import annotations

import codecs
import ctypes
import operator
import os
import threading
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

from ripelm.models.errors import ModelFormatError, ModelNotFoundError

__all__ = ["StreamDecoder", "Tokenizer", "quiet_llama_logs"]

# Used only if this llama-cpp-python predates llama_vocab_is_eog: the end-of-turn markers of common families.
_KNOWN_EOG_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<|return|>", "<|call|>", "</s>",
)  # fmt: skip

_log_callback: Any = None  # must outlive every llama.cpp call: llama.cpp keeps the raw function pointer
_log_lock = threading.Lock()


def quiet_llama_logs() -> None:
    """Route llama.cpp's (process-wide) log output to a no-op. Idempotent.

    ``verbose=False`` does not cover everything: context creation still logs warnings through the callback
    that llama-cpp-python installs at import.
    """
    global _log_callback
    with _log_lock:
        if _log_callback is not None:
            return
        import llama_cpp

        @llama_cpp.llama_log_callback
        def _discard(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        llama_cpp.llama_log_set(_discard, ctypes.c_void_p(0))
        _log_callback = _discard


def _truthy(value: Any) -> bool | None:
    # llama-cpp-python hands metadata over as strings ("true"/"false").
    if value is None:
        return None
    return str(value).strip().lower() in ("1", "true")


class Tokenizer:
    """A GGUF model's tokenizer, loaded vocabulary-only through llama.cpp."""

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ModelNotFoundError(f"no model file at {path}")
        quiet_llama_logs()
        import llama_cpp

        self._lib = llama_cpp
        try:
            self._llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except Exception as exc:  # llama.cpp reports every load failure as ValueError/RuntimeError
            raise ModelFormatError(f"cannot load the tokenizer of {path.name}: {exc}") from exc
        self.path = path
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.vocab_size: int = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos_id: int | None = self._special_id(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id: int | None = self._special_id(llama_cpp.llama_vocab_eos(self._vocab))
        # llama.cpp's resolved value: the GGUF key, or the vocabulary type's default when the key is absent.
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        space_prefix = _truthy(self._llm.metadata.get("tokenizer.ggml.add_space_prefix"))
        if space_prefix is None:  # llama.cpp's default: SentencePiece vocabularies add a space prefix
            space_prefix = llama_cpp.llama_vocab_type(self._vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
        self._strip_space = space_prefix
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def _special_id(self, token: int) -> int | None:
        return int(token) if 0 <= token < self.vocab_size else None

    # -- ids <-> text ---------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``special``: spell-outs like ``<|im_start|>`` become their single id.

        ``add_bos`` defaults to the model's ``tokenizer.ggml.add_bos_token``.
        """
        vocab = self._require_open()
        data = text.encode("utf-8", errors="replace")
        # llama.cpp only adds BOS when the vocabulary says so; an explicit add_bos=True must win, so BOS is
        # always added here rather than by llama.cpp.
        capacity = len(data) + 8  # tokens never outnumber bytes (+1 for an SPM space prefix)
        while True:
            buffer = (self._lib.llama_token * capacity)()
            count = self._lib.llama_tokenize(vocab, data, len(data), buffer, capacity, False, special)
            if count >= 0:
                break
            if -count <= capacity:
                raise RuntimeError(f"llama_tokenize failed with {count}")
            capacity = -count
        ids = list(buffer[:count])
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of ``ids``. ``special=False`` renders control tokens (``<|im_end|>``...) as nothing."""
        decoder = StreamDecoder(self, special=special)
        return "".join(decoder.feed(token) for token in ids) + decoder.flush()

    def token_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character); control tokens spelled out."""
        return self._piece(token_id, True)

    def _piece(self, token_id: int, special: bool) -> bytes:
        key = (token_id, special)
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._render_piece(token_id, special)
            self._pieces[key] = piece
        return piece

    def _render_piece(self, token_id: int, special: bool) -> bytes:
        vocab = self._require_open()
        token_id = operator.index(token_id)  # numpy/torch integer scalars are fine, floats are not
        # llama.cpp indexes its tables with the id unchecked: an out-of-range id is a crash, not an error.
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._lib.llama_token_to_piece(vocab, token_id, buffer, size, 0, special)
            if n >= 0:
                return buffer.raw[:n]
            size = -n  # too small: llama.cpp returns minus the size it needs

    # -- special tokens -------------------------------------------------------------------------------------

    @property
    def bos_text(self) -> str:
        """The BOS token's text, for chat templates' ``bos_token`` ("" when the model has none)."""
        return "" if self.bos_id is None else self.token_piece(self.bos_id).decode("utf-8", errors="replace")

    @property
    def eos_text(self) -> str:
        """The EOS token's text, for chat templates' ``eos_token`` ("" when the model has none)."""
        return "" if self.eos_id is None else self.token_piece(self.eos_id).decode("utf-8", errors="replace")

    @cached_property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end a generation: llama.cpp's end-of-generation set (EOS, EOT, ``<|im_end|>``...)."""
        vocab = self._require_open()
        is_eog = getattr(self._lib, "llama_vocab_is_eog", None)
        if is_eog is not None:
            # One C call per id (~30 ms for 49k ids), so computed on first use rather than at load.
            ids = {token for token in range(self.vocab_size) if is_eog(vocab, token)}
        else:
            ids = set()
            for text in _KNOWN_EOG_TEXTS:
                found = self.encode(text, add_bos=False, special=True)
                if len(found) == 1 and self.token_piece(found[0]) == text.encode():
                    ids.add(found[0])
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return frozenset(ids)

    @property
    def eog_ids(self) -> frozenset[int]:
        """Alias of :attr:`eot_ids` under llama.cpp's name."""
        return self.eot_ids

    # -- lifecycle ------------------------------------------------------------------------------------------

    def _require_open(self) -> Any:
        if self._vocab is None:
            raise RuntimeError("the tokenizer is closed")
        return self._vocab

    def close(self) -> None:
        """Free llama.cpp's copy of the vocabulary. Further calls raise RuntimeError."""
        if self._vocab is not None:
            self._vocab = None
            self._llm.close()

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tokenizer({self.path.name!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns token ids, fed one at a time, into the text that is safe to show so far.

    Byte-level BPE (SmolLM2, Llama 3, Qwen) and SentencePiece byte-fallback tokens can carry part of a UTF-8
    character; those bytes are held back until the character is complete, so no half character (or U+FFFD)
    is ever printed mid-stream. ``"".join(feed(i) for i in ids) + flush()`` equals ``decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece: the first word's "▁" is the space prefix the encoder added; llama.cpp's detokenizer
        # drops it on the first non-BOS token, and so do we.
        self._strip_space = tokenizer._strip_space

    def feed(self, token_id: int) -> str:
        """Add one token; returns the newly completed text (often "", never a partial character)."""
        piece = self._tokenizer._piece(token_id, self._special)
        if self._strip_space and token_id != self._tokenizer.bos_id:
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End of stream: returns held-back bytes of an unfinished character, as U+FFFD."""
        return self._utf8.decode(b"", final=True)
