"""Chat templates: render a model's Jinja chat template (untrusted input from the GGUF file) into a prompt.

This module is the entry point; the environment lives in `template_sandbox` and the limits in
`template_limits`. A GGUF file is data from the internet, and its ``tokenizer.chat_template``
is a program: llama-cpp-python's CVE-2024-34359 was code execution through exactly this string. Templates
render in jinja2's ``ImmutableSandboxedEnvironment`` configured the way HF transformers does (trim_blocks,
lstrip_blocks, loopcontrols, ``raise_exception``, ``strftime_now``, a plain-JSON ``tojson``), and on top:

* any access to an unsafe attribute raises at once (jinja would hand back a silent Undefined);
* type objects cannot reach mutating methods (``dict.update(messages[0], ...)`` bypasses jinja's own check);
* time and size limits are enforced *while* rendering, at checkpoints the template cannot avoid: every loop
  iteration, call, filter, intercepted operator and output write checks the clock, and every operation that
  can make a value much larger than its inputs (``*``, ``**``, ``+``, ``%``, ``~``, ``format``, ``replace``,
  ``join``, ``indent``, ``center``, ...) is size-checked before it allocates; container literals and the
  results of calls and filters, which only add references, are sized right after.

Every failure - sandbox violation, syntax error, undefined value, exceeded limit - surfaces as one
:class:`TemplateError` with a one-line message.
"""

from __future__ import annotations

from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateSyntaxError

from ripelm.runtime.template_limits import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIME_LIMIT,
    GUARD,
    Guard,
    TemplateError,
    one_line,
)
from ripelm.runtime.template_sandbox import InsertCheckpoints, make_environment

__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "TemplateError"]

# HF transformers' historical default template, used when a model ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEFAULT_MAX_SOURCE = 64 * 1024


def _translate(exc: BaseException) -> TemplateError:
    """Map whatever a render raised to one TemplateError with a one-line message."""
    if isinstance(exc, SecurityError):
        return TemplateError(f"chat template refused: {one_line(str(exc))}")
    if isinstance(exc, TemplateSyntaxError):
        return TemplateError(
            f"chat template syntax error on line {exc.lineno}: {one_line(exc.message or '')}"
        )
    if isinstance(exc, jinja2.TemplateError):
        return TemplateError(f"chat template error: {one_line(str(exc))}")
    if isinstance(exc, RecursionError):
        return TemplateError("chat template nested or recursed too deeply")
    if isinstance(exc, MemoryError):
        return TemplateError("chat template ran out of memory")
    return TemplateError(f"chat template failed: {type(exc).__name__}: {one_line(str(exc))}")


class ChatTemplate:
    """A compiled, sandboxed chat template. Compiling happens here, so a broken template fails at load."""

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
        self._env = make_environment()
        token = GUARD.set(Guard(self.time_limit, self.max_output))
        try:
            tree = self._env.parse(self.source)
            tree = InsertCheckpoints().visit(tree)
            tree.set_environment(self._env)
            self._template = self._env.from_string(tree)
        except TemplateError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        finally:
            GUARD.reset(token)

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
        guard = Guard(self.time_limit, self.max_output)
        token = GUARD.set(guard)
        chunks = self._template.generate(context)
        try:
            parts: list[str] = []
            size = 0
            for chunk in chunks:
                size += len(chunk)
                if size > self.max_output:
                    raise TemplateError(f"chat template output exceeded {self.max_output} characters")
                guard.tick()
                parts.append(chunk)
            return "".join(parts)
        except TemplateError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        finally:
            chunks.close()
            GUARD.reset(token)
