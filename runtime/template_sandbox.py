"""The jinja environment chat templates compile and render in: jinja2's ImmutableSandboxedEnvironment set up
as HF transformers does, plus the refusals that the render process's limits (`template_worker`) cannot make.

Public jinja API only: sandbox hooks, filters, globals, an extension and ``Environment.concat``. Time and
memory are bounded by the render process; what stays here is what those bounds do not see: integer
arithmetic that is one C call of minutes inside the memory limit (``9 ** 9 ** 9``), text collected into
hidden buffers (set blocks, macros) past the value limit, width/count arguments past it, and values built
from shared references that print exponentially while using no memory (``[x, x]`` doubled in a loop), which
are refused when read back. Unsafe attributes raise at the access rather than giving a silent Undefined.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import TemplateError as JinjaError
from jinja2 import TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Namespace

MAX_INT_BITS = 8192  # no chat template needs 2,500-digit numbers
# Filters whose int arguments are widths or counts of what they produce.
_SIZE_FILTERS = ("center", "indent", "truncate", "batch", "slice")
# jinja's ImmutableSandboxedEnvironment only guards instances; ``dict.update(messages[0], ...)`` reaches the
# same methods through the type, so the mutable types' attributes are refused altogether.
_MUTABLE_TYPES = (list, dict, set, bytearray, deque)


class Refusal(Exception):
    """A render stopped by a rule of this module; its message is the final one-line error text."""


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """The one-line message for whatever parsing, compiling or rendering raised."""
    if isinstance(exc, Refusal):
        return str(exc)
    if isinstance(exc, SecurityError):
        return f"chat template refused: {one_line(str(exc))}"
    if isinstance(exc, TemplateSyntaxError):
        return f"chat template syntax error on line {exc.lineno}: {one_line(exc.message or '')}"
    if isinstance(exc, JinjaError):
        return f"chat template error: {one_line(str(exc))}"
    if isinstance(exc, RecursionError):
        return "chat template nested or recursed too deeply"
    if isinstance(exc, MemoryError):
        return "chat template exceeded its memory limit"
    return f"chat template failed: {type(exc).__name__}: {one_line(str(exc))}"


def _raise_exception(message: Any) -> NoReturn:
    # Templates use this to reject a conversation they cannot format (e.g. roles that do not alternate).
    raise Refusal(f"chat template rejected the conversation: {one_line(str(message))}")


def _strftime_now(format: str) -> str:  # HF's parameter name, in case a template passes it by keyword
    return datetime.now().strftime(str(format))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # HF's tojson: plain json.dumps (jinja's own one HTML-escapes and returns Markup, which changes prompts).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


class _GenerationTag(Extension):
    """HF's ``{% generation %}`` marks assistant text for training masks; for inference it is a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})
    value_limit = 4_000_000  # characters; the render process sets it per render (4 x the output limit)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, type) and issubclass(obj, _MUTABLE_TYPES):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(f"access to unsafe attribute {attribute!r} of {type(obj).__name__}")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if isinstance(left, int) and isinstance(right, int):
            power = operator == "**" and abs(left) > 1 and right > 0
            bits = left.bit_length() * right if power else left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise Refusal("chat template refused: integer too large")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self._sized(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self._sized(super().getitem(obj, argument))

    def _sized(self, value: Any) -> Any:
        if _children(value) is not None and _expanded_size(value) > self.value_limit:
            raise Refusal(f"chat template value exceeded {self.value_limit} characters")
        return value

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Joins every hidden buffer (set blocks, macros, filter blocks): sized before the join."""
        parts = parts if isinstance(parts, list) else list(parts)
        if sum(map(len, parts)) > self.value_limit:
            raise Refusal(f"chat template wrote more than {self.value_limit} characters")
        return "".join(parts)


# namespace() keeps its values where only jinja's own code reads them, so each one a render creates records
# its arguments here (by id, keeping it alive); the render process clears this after every render.
NAMESPACE_ARGS: dict[int, tuple[Namespace, list[Any]]] = {}


class _RecordedNamespace(Namespace):
    def __init__(*args: Any, **kwargs: Any) -> None:
        Namespace.__init__(*args, **kwargs)
        NAMESPACE_ARGS[id(args[0])] = (args[0], [*args[1:], *kwargs.values()])


def _children(item: Any) -> Iterable[Any] | None:
    if isinstance(item, dict):
        return item.values()
    if isinstance(item, (list, tuple)):
        return item
    if isinstance(item, Cycler):
        return item.items
    return NAMESPACE_ARGS.get(id(item), (None, ()))[1] if isinstance(item, Namespace) else None


def _expanded_size(obj: Any) -> int:
    """Elements in ``obj`` printed out, each distinct container sized once and counted per reference, so a
    shared-reference DAG of 2**64 printed elements sizes in 64 steps."""
    memo: dict[int, int] = {}

    def size(item: Any, depth: int) -> int:
        kids = _children(item)
        if kids is None or depth > 200:
            return 1
        if id(item) not in memo:
            memo[id(item)] = 0  # a container holding itself prints "..."
            memo[id(item)] = 1 + sum(size(kid, depth + 1) for kid in kids)
        return memo[id(item)]

    return size(obj, 0)


def _counted(env: _Sandbox, func: Any) -> Any:
    @functools.wraps(func)  # keeps jinja's pass_* marker, so the arguments jinja passes stay the same
    def checked(*args: Any, **kwargs: Any) -> Any:
        for value in (*args[1:], *kwargs.values()):
            if isinstance(value, int) and abs(value) > env.value_limit:
                raise Refusal(f"chat template refused: argument {value} is over the size limit")
        return func(*args, **kwargs)

    return checked


def make_environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, optimized=False, extensions=[loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.filters.update({name: _counted(env, env.filters[name]) for name in _SIZE_FILTERS})
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_RecordedNamespace)  # fmt: skip
    return env
