"""Reasoning models (Qwen3, DeepSeek-R1 distills, QwQ): their `<think>...</think>` block split from the
answer as text streams in, and whether a chat template can think, or switch thinking off.

OpenAI-compatible servers return the block as `reasoning_content` (vLLM, llama.cpp's server, DeepSeek's
API), Ollama as `message.thinking`. Templates that open the block themselves (DeepSeek-R1's generation
prompt ends in `<think>` and a newline) make the model's output start inside it: `opens_thinking` tells.
"""

from __future__ import annotations


def thinks(template: str) -> bool:
    """Whether a chat template knows a thinking mode (Qwen3-style `<think>` blocks, `enable_thinking`)."""
    return "enable_thinking" in template or "<think>" in template


def can_switch_off(template: str) -> bool:
    """Whether the template turns thinking off for `enable_thinking=False` (Qwen3 and hybrids)."""
    return "enable_thinking" in template


def opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open `<think>` block (the template opened it)."""
    return prompt.rstrip().endswith("<think>")


class ThinkSplitter:
    """Splits streamed text into (thinking, content): a leading `<think>...</think>` block (or, when the
    template opened it, everything up to `</think>`) is thinking, the rest content. A partial tag that
    straddles two chunks is held back until the next one."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False):
        self.inside = thinking
        self.buf = ""
        self.finished = False  # past the thinking block (or content came first): the rest is content

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        thinking: list[str] = []
        content: list[str] = []
        while self.buf:
            if self.finished:
                content.append(self.buf)
                self.buf = ""
                break
            tag = self.CLOSE if self.inside else self.OPEN
            i = self.buf.find(tag)
            if i >= 0:
                before, rest = self.buf[:i], self.buf[i + len(tag) :]
                if not self.inside and before.strip():  # text before any <think>: no thinking block
                    self.finished = True
                    continue
                (thinking if self.inside else content).append(before)
                self.finished = self.inside
                self.inside, self.buf = not self.inside, rest
                continue
            keep = next((k for k in range(len(tag) - 1, 0, -1) if self.buf.endswith(tag[:k])), 0)
            out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
            if not self.inside and out.strip():
                self.finished = True
            (thinking if self.inside else content).append(out)
            break
        return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        return (rest, "") if self.inside else ("", rest)
