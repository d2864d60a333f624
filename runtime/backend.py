"""What every engine offers the app: tokenize, render a chat, stream a generation.

A `Backend` turns a prompt (token ids) and `SamplingParams` into a stream of token ids; the shared
text pipeline here (streaming detokenizer, end-of-generation tokens, stop strings, token budget, stats)
turns that into `TokenEvent`s, so every engine stops, counts and reports the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ripelm.runtime.errors import EmptyPromptError, check_context
from ripelm.runtime.sampling import SamplingParams
from ripelm.runtime.stopping import StopStrings
from ripelm.runtime.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:  # Jinja loads with a backend's template, not with the chat app's window
    from ripelm.runtime.chat_template import ChatTemplate


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V were reused instead of recomputed
    generated_tokens: int = 0
    ttft_s: float = 0.0  # time to first token (prefill + first sample)
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string), "length", "cancelled"
    engine: str = ""
    drafted: int = 0  # speculative decoding: draft tokens proposed
    accepted: int = 0  # ... and accepted by the target
    target_forwards: int = 0  # target passes that produced tokens: the prefill, then one per (verify) step
    emitted_tokens: int = 0  # tokens the engine produced while decoding (generated_tokens plus any EOS)
    speculation: str = ""  # the draft-length controller's state or decision, e.g. "k=4, predicted 1.9x"
    logprobs: list | None = None  # with SamplingParams.logprobs: a TokenLogprob per token the engine sent

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.emitted_tokens / self.target_forwards if self.target_forwards else 0.0


@dataclass
class TokenEvent:
    text: str
    token_id: int | None = None
    done: bool = False
    stats: GenerationStats | None = None


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared by each backend (callers read these, never probe attributes)."""

    batched: bool = False  # concurrent generations run together (callers need no lock)
    cancel: bool = False  # submit() / request_ids(): a request can be cancelled from another thread mid-step
    kv_stats: bool = False  # kv_blocks(): (used, total) blocks of its paged KV pools, a draft's included
    takes_messages: bool = False  # a server engine: takes chat messages, owns template, tokenizer and context
    samples: bool = False  # submit(prompt, params, n) / request_ids(req, stats, i): n samples share a prompt
    logprobs: bool = False  # honours SamplingParams.logprobs (GenerationStats.logprobs)


class Backend(Protocol):
    name: str
    caps: Capabilities
    tokenizer: Tokenizer
    template: ChatTemplate
    context_length: int
    device: str

    def generate_ids(
        self, prompt: list[int], params: SamplingParams, stats: GenerationStats
    ) -> Iterator[int]:
        """Sampled token ids, one at a time, until the caller stops iterating. Fills prompt/cache stats."""
        ...

    def close(self) -> None: ...


def prompt_ids(backend: Backend, text: str, *, add_bos: bool | None = None) -> list[int]:
    if not text.strip():
        raise EmptyPromptError("the prompt is empty")
    ids = backend.tokenizer.encode(text, add_bos=add_bos)
    check_context(len(ids), backend.context_length)
    return ids


def stream(
    backend: Backend,
    prompt: list[int],
    params: SamplingParams,
    cancel: threading.Event | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[TokenEvent]:
    """Run a generation and yield text as it becomes safe to show; the last event has done=True and stats
    (`stats`, when given, is filled as it goes: a caller can read the figures before the end)."""
    params.validate()
    stats = stats or GenerationStats()
    stats.prompt_tokens, stats.engine = len(prompt), backend.name
    check_context(len(prompt), backend.context_length)
    budget = min(params.max_tokens, backend.context_length - len(prompt))
    decoder = StreamDecoder(backend.tokenizer)
    stops = StopStrings(params.stop)
    eog = backend.tokenizer.eog_ids
    t0 = time.perf_counter()
    t_first = None
    finish = "length"
    gen = backend.generate_ids(prompt, params, stats)
    try:
        for tok in gen:
            now = time.perf_counter()
            if t_first is None:
                t_first = now
            if tok in eog:
                finish = "stop"
                break
            stats.generated_tokens += 1
            text = stops.feed(decoder.feed(tok))
            if text:
                yield TokenEvent(text, tok)
            if stops.hit is not None:
                finish = "stop"
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if stats.generated_tokens >= budget:
                break
    finally:
        gen.close()
    tail = stops.feed(decoder.flush()) + stops.flush()
    end = time.perf_counter()
    stats.finish_reason = finish
    stats.total_s = end - t0
    if t_first is not None:
        stats.ttft_s = t_first - t0
        computed = max(1, stats.prompt_tokens - stats.cached_tokens)
        stats.prefill_tok_s = computed / max(stats.ttft_s, 1e-9)
        if stats.generated_tokens > 1:
            stats.decode_tok_s = (stats.generated_tokens - 1) / max(end - t_first, 1e-9)
    yield TokenEvent(tail, None, done=True, stats=stats)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (how much cached K/V a new prompt reuses)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
