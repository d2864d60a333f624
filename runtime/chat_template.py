"""Chat templates: render a model's Jinja chat template (untrusted input from the GGUF file) into a prompt.

A GGUF file is data from the internet, and its ``tokenizer.chat_template`` is a program: llama-cpp-python's
CVE-2024-34359 was code execution through exactly this string. Templates compile in `template_sandbox`'s
environment (jinja2's ``ImmutableSandboxedEnvironment`` configured the way HF transformers does:
trim_blocks, lstrip_blocks, loopcontrols, ``raise_exception``, ``strftime_now``, a plain-JSON ``tojson``;
unsafe attributes raise at the access) and render in `template_worker`'s process, which bounds each render's
time and memory with the operating system's limits, so a template that loops forever or allocates without
end costs that process a render and the app nothing.

Every failure - sandbox violation, syntax error, undefined value, exceeded limit - surfaces as one
:class:`TemplateError` with a one-line message.
"""

from __future__ import annotations

from typing import Any

from ripelm.models.errors import RipelmError
from ripelm.runtime.template_sandbox import describe, make_environment
from ripelm.runtime.template_worker import RenderProcess

__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "TemplateError"]

# HF transformers' historical default template, used when a model ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_TIME_LIMIT = 2.0
DEFAULT_MAX_OUTPUT = 1_000_000
DEFAULT_MAX_SOURCE = 64 * 1024

# One render process for the whole app, started by the first template.
_RENDERER = RenderProcess()


class TemplateError(RipelmError):
    """A chat template was refused, failed, or exceeded a limit while rendering."""


class ChatTemplate:
    """A sandboxed chat template. It is parsed here, so a syntax error fails at load; it compiles in the
    render process, as jinja evaluates constant expressions while compiling (``{{ '%0999999999d' % 1 }}``)."""

    def __init__(
        self,
        source: str | None,
        bos_token: str = "",
        eos_token: str = "",
        time_limit: float = DEFAULT_TIME_LIMIT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_source: int = DEFAULT_MAX_SOURCE,
    ) -> None:
        if source is not None and not isinstance(source, str):  # GGUF metadata can hold any type here
            raise TemplateError(f"chat template refused: expected a string, got {type(source).__name__}")
        self.is_fallback = source is None or not source.strip()
        self.source = CHATML_TEMPLATE if self.is_fallback else source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_limit = float(time_limit)
        self.max_output = int(max_output)
        source_bytes = len(self.source.encode("utf-8", errors="replace"))
        if source_bytes > max_source:
            raise TemplateError(
                f"chat template refused: {source_bytes} bytes, over the {max_source}-byte limit"
            )
        try:
            make_environment().parse(self.source)
        except Exception as exc:
            raise TemplateError(describe(exc)) from exc
        _RENDERER.start()

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render ``messages`` to prompt text. Extra keyword arguments (``tools``, ...) become variables."""
        context = {
            **variables,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        ok, text = _RENDERER.render(self.source, context, self.time_limit, self.max_output)
        if not ok:
            raise TemplateError(text)
        return text
