"""The status bar: engine and device, live tokens/s, time to first token, draft acceptance, KV blocks in
use, context used of the window, and short notices (trimmed history, cancel latency)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.widgets import Static


@dataclass
class StatusNumbers:
    engine: str = ""
    device: str = ""
    model: str = ""
    tok_s: float | None = None
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


class StatusBar(Static):
    def __init__(self) -> None:
        super().__init__("", id="status")
        self.numbers = StatusNumbers()

    def show(self, **changes: object) -> None:
        for k, v in changes.items():
            setattr(self.numbers, k, v)
        self.update(render_status(self.numbers))
