"""The llama.cpp engine (through llama-cpp-python): runs what the native engine does not, and is the
reference our logits are checked against.

llama.cpp maps the model file and reads weights straight from the mapping, so a file truncated under it
would fault (SIGBUS) in the middle of a generation. A file up to COPY_AT_LOAD_MAX_BYTES is loaded with
`use_mmap=False` (read into llama.cpp's own buffers), and every request first checks that the loaded file
is unchanged (`ModelFileGuard`); models/file_guard.py gives the reasons.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ripelm.models.errors import ModelFileChangedError
from ripelm.models.file_guard import COPY_AT_LOAD_MAX_BYTES, FileState, ModelFileGuard, changed_message
from ripelm.models.gguf_file import GGUFFile, open_gguf
from ripelm.runtime.backend import Capabilities, GenerationStats, common_prefix
from ripelm.runtime.chat_template import ChatTemplate
from ripelm.runtime.errors import BackendError, BadSamplingError
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.tokenizer import Tokenizer, quiet_llama_logs


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppBackend:
    name = "llama.cpp"
    caps = Capabilities()
    device = "cpu"

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        logits_all: bool = False,
        n_batch: int = 512,
        tokenizer: Tokenizer | None = None,
        gguf: GGUFFile | None = None,
    ):
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise BackendError(f"llama-cpp-python is not installed: {e}") from e
        self.path = Path(model_path)
        g = gguf or open_gguf(self.path)  # validate before llama.cpp's own parser touches the file
        trained = int(g.get(f"{g.architecture}.context_length", 4096) or 4096)
        template_src = g.get("tokenizer.chat_template")
        loaded = g.state or FileState.of(self.path.stat())
        g.close()
        self.context_length = min(n_ctx or 4096, trained)
        # Held from before llama.cpp opens the file, so the file it loads is the one validated above.
        self.file_guard = ModelFileGuard(self.path, loaded)
        quiet_llama_logs()
        try:
            self.llm = llama_cpp.Llama(
                str(self.path),
                n_ctx=self.context_length,
                n_threads=n_threads or default_threads(),
                n_batch=n_batch,
                n_ubatch=n_batch,
                logits_all=logits_all,
                use_mmap=loaded.size > COPY_AT_LOAD_MAX_BYTES,
                verbose=False,
            )
        except Exception as e:
            self.file_guard.close()
            raise BackendError(f"llama.cpp could not load {self.path.name}: {e}") from e
        try:
            self.file_guard.check()
            self._check_path_names(loaded)
        except ModelFileChangedError:
            self.llm.close()
            self.file_guard.close()
            raise
        self.tokenizer = tokenizer or Tokenizer(self.path)
        self.template = ChatTemplate(
            template_src, bos_token=self.tokenizer.bos_text, eos_token=self.tokenizer.eos_text
        )

    @property
    def kv_bytes(self) -> int:
        """llama.cpp's K/V cache for the whole context (float16 K and V per layer and K/V head)."""
        import llama_cpp

        model = self.llm.model
        heads = max(1, llama_cpp.llama_model_n_head(model))
        head_dim = llama_cpp.llama_model_n_embd(model) // heads
        per_token = llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim
        return 2 * 2 * per_token * self.context_length

    def _check_path_names(self, loaded: FileState) -> None:
        """llama.cpp opened the file by its path: that must still be the file the guard holds."""
        try:
            now = FileState.of(os.stat(self.path))
        except OSError:
            return  # removed since: what llama.cpp opened was still the guarded file
        if (now.dev, now.ino) != (loaded.dev, loaded.ino):
            raise ModelFileChangedError(changed_message(self.path, "it was replaced while it loaded"))

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        self.file_guard.check()
        llm = self.llm
        stats.cached_tokens = common_prefix(list(llm._input_ids), prompt)
        if params.seed is not None:
            llm.set_seed(params.seed)
        grammar = llama_grammar(params.grammar) if params.grammar is not None else None
        yield from llm.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repetition_penalty,
            reset=True,  # prefix reuse: llama-cpp-python keeps the K/V of the common prefix; False appended
            # every prompt after the last one, until the context overflowed (llama_decode returned 1)
            grammar=grammar,
        )

    def teacher_forced_logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] for every position (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()
        self.file_guard.close()


def llama_grammar(grammar: tuple[str, str]):  # noqa: ANN201 - a llama_cpp.LlamaGrammar
    """Structured output through llama.cpp's own grammar sampler (GBNF): JSON objects, JSON schemas (llama.cpp
    converts them to GBNF) and GBNF itself; regex and Lark grammars are the native engine's (llguidance)."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    kind, text = grammar
    try:
        if kind == "json_object":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if kind == "json_schema":
            return LlamaGrammar.from_string(json_schema_gbnf(text), verbose=False)
        if kind == "gbnf":
            return LlamaGrammar.from_string(text, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise BadSamplingError(f"llama.cpp cannot use this {kind.replace('_', ' ')} grammar: {e}") from None
    raise BackendError(f"a {kind} grammar needs the native engine (llama.cpp takes JSON schemas and GBNF)")


def json_schema_gbnf(schema: str) -> str:
    """GBNF for a JSON schema (text) by llama-cpp-python's converter, with two fixes: bounded integers become
    enums (`_bounded_ints`: it ignores integer `minimum`/`maximum`), and its string characters exclude raw
    control characters (it allows them, `[^"\\\\]`, so a model could write a newline inside a string and
    the JSON would not parse; llama.cpp's own converter excludes them, as JSON does)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(json.dumps(_bounded_ints(json.loads(schema))))
    return gbnf.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')


def _bounded_ints(schema):  # noqa: ANN001, ANN202 - JSON values
    """The schema with every integer of both `minimum` and `maximum` (at most 1000 values apart) as an enum:
    llama-cpp-python's JSON-schema-to-GBNF converter ignores integer bounds, its enums it enforces."""
    if isinstance(schema, list):
        return [_bounded_ints(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded_ints(v) for k, v in schema.items()}
    lo, hi = out.get("minimum"), out.get("maximum")
    if out.get("type") == "integer" and isinstance(lo, int) and isinstance(hi, int) and 0 <= hi - lo <= 1000:
        if "enum" not in out:
            out["enum"] = list(range(lo, hi + 1))
    return out
