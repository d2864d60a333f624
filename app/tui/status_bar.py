"""The status bar: engine and device, live tokens/s, time to first token, draft acceptance, KV blocks in
use, context used of the window, and short notices (trimmed history, cancel latency).

A server engine (`--engine openai`) has no local tokenizer, context window or KV cache: its bar shows
the server's model and address, characters/s while streaming, and tokens/s once the server's usage
numbers arrive at the end of the reply (characters/s if it sends none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.widgets import Static

from ripelm.runtime.backend import GenerationStats


@dataclass
class StatusNumbers:
    engine: str = ""
    device: str = ""
    model: str = ""
    tok_s: float | None = None
    chars_s: float | None = None  # a server's stream, where no token counts are known yet
    ttft_ms: float | None = None
    acceptance: float | None = None  # draft tokens accepted / drafted, when speculating
    kv_used: int | None = None
    kv_total: int | None = None
    ctx_used: int | None = None
    ctx_limit: int | None = None
    notice: str = ""


def render_status(n: StatusNumbers) -> str:
    parts = [f"{n.model or '-'} · {n.engine or '-'} · {n.device or '-'}"]
    if n.tok_s is not None:
        parts.append(f"{n.tok_s:.1f} tok/s")
    elif n.chars_s is not None:
        parts.append(f"{n.chars_s:.0f} chars/s")
    if n.ttft_ms is not None:
        parts.append(f"ttft {n.ttft_ms:.0f} ms")
    if n.acceptance is not None:
        parts.append(f"draft {n.acceptance * 100:.0f}%")
    if n.kv_used is not None and n.kv_total:
        parts.append(f"KV {n.kv_used}/{n.kv_total}")
    if n.ctx_used is not None and n.ctx_limit:
        parts.append(f"ctx {n.ctx_used}/{n.ctx_limit}")
    if n.notice:
        parts.append(n.notice)
    return " │ ".join(parts)


def is_remote(backend: Any) -> bool:
    """A server engine: it takes chat messages, and owns the tokenizer, template and context window."""
    return backend.caps.takes_messages


def backend_numbers(backend: Any, model: str) -> dict[str, Any]:
    """The bar's model, engine and device (and context window) for an open backend."""
    if is_remote(backend):
        return dict(model=backend.model, engine=backend.name, device=backend.base_url, ctx_limit=None)
    return dict(
        model=model, engine=backend.name, device=str(backend.device), ctx_limit=backend.context_length
    )


def live_numbers(
    remote: bool, tokens: int, chars: int, elapsed_s: float, prompt_tokens: int
) -> dict[str, Any]:
    """Speed while a reply streams (`elapsed_s` since its first piece)."""
    if remote:  # a server's chunks are not guaranteed to be one token each
        return dict(tok_s=None, chars_s=chars / elapsed_s)
    return dict(tok_s=(tokens - 1) / elapsed_s, chars_s=None, ctx_used=prompt_tokens + tokens)


def done_numbers(s: GenerationStats, remote: bool, chars: int) -> dict[str, Any]:
    """The finished reply's numbers; a server's are tokens only if it reported usage."""
    out: dict[str, Any] = dict(
        tok_s=s.decode_tok_s or None,
        chars_s=None,
        ttft_ms=s.ttft_s * 1000,
        acceptance=s.acceptance_rate if s.drafted else None,
        ctx_used=s.prompt_tokens + s.generated_tokens,
    )
    if remote and not s.prompt_tokens:  # no usage numbers: the token count is a count of chunks
        streamed_s = s.total_s - s.ttft_s
        out.update(tok_s=None, chars_s=chars / streamed_s if streamed_s > 0 else None)
    return out


class StatusBar(Static):
    def __init__(self) -> None:
        super().__init__("", id="status")
        self.numbers = StatusNumbers()

    def show(self, **changes: object) -> None:
        for k, v in changes.items():
            setattr(self.numbers, k, v)
        self.update(render_status(self.numbers))
