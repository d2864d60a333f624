"""Chat templates: render a model's Jinja chat template (untrusted input from the GGUF file) into a prompt.

This module owns the sandbox. A GGUF file is data from the internet, and its ``tokenizer.chat_template``
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

import functools
import inspect
import itertools
import json
import re
import string
import time
import types
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2 import nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from ripelm.models.errors import RipelmError

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

# jinja's own sandbox bound on range(); a chat template iterates over messages, not millions of ints.
MAX_RANGE = 100_000
# Intermediate values may be larger than the final output (a template can build a string and trim it), but
# not unboundedly: this many times max_output, in characters (containers count roughly their repr length).
_VALUE_FACTOR = 4
# Ints bigger than this are refused in * and **: no chat template needs 2,500-digit numbers, and a huge int
# costs time and memory in a single uninterruptible C call.
_MAX_INT_BITS = 8192
# Methods that would let str.translate / expandtabs blow a small value up by an unchecked factor.
_REFUSED_STR_METHODS = frozenset({"translate", "expandtabs", "maketrans"})
# Filters no chat template needs that would each need their own size check (wordwrap repeats its wrapstring
# per line, urlize/xmlattr/pprint build markup or reprs); simpler to leave them out.
_REMOVED_FILTERS = ("wordwrap", "urlize", "xmlattr", "pprint")
# jinja's ImmutableSandboxedEnvironment only guards instances; these reach the same methods through the type
# (``dict.update(messages[0], ...)``), so they are refused on type objects too.
_MUTATING_METHODS = frozenset(
    {
        "append", "clear", "extend", "insert", "pop", "popitem", "remove", "reverse", "sort", "setdefault",
        "update", "add", "discard", "difference_update", "intersection_update",
        "symmetric_difference_update", "appendleft", "extendleft", "popleft", "rotate",
    }
)  # fmt: skip
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?P<w>\*|\d+)?(?:\.(?P<p>\*|\d*))?[hlL]?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")


class TemplateError(RipelmError):
    """A chat template was refused, failed, or exceeded a limit while rendering."""


class _Guard:
    """The limits of one render; reached from jinja callbacks through ``_GUARD``."""

    __slots__ = ("deadline", "time_limit", "max_output", "value_limit", "work_limit", "work")

    def __init__(self, time_limit: float, max_output: int) -> None:
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.max_output = max_output
        self.value_limit = max_output * _VALUE_FACTOR
        # Text written into *any* buffer (macros, set blocks, filter blocks are joined without passing
        # through the output stream), so repeated writes into a hidden buffer are bounded too.
        self.work_limit = max_output * _VALUE_FACTOR
        self.work = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template exceeded {float(self.time_limit)} s")

    def check_size(self, size: int) -> None:
        if size > self.value_limit:
            raise TemplateError(f"chat template value exceeded {self.value_limit} characters")

    def check_value(self, value: Any) -> None:
        self.check_size(len(value) if isinstance(value, str) else _size(value, self.value_limit))

    def check_count(self, value: Any) -> None:
        """An int passed as a width/count/repeat argument may not exceed what could ever fit in a value."""
        if isinstance(value, int) and abs(value) > self.value_limit:
            raise TemplateError(f"chat template refused: argument {value} is over the size limit")

    def write(self, size: int) -> None:
        self.work += size
        if self.work > self.work_limit:
            raise TemplateError(f"chat template wrote more than {self.work_limit} characters")


_GUARD: ContextVar[_Guard] = ContextVar("ripelm_chat_template_guard")


def _guard() -> _Guard:
    guard = _GUARD.get(None)
    # Only reachable if jinja evaluates a callback outside render()/compile; keep size checks working.
    return guard if guard is not None else _Guard(DEFAULT_TIME_LIMIT, DEFAULT_MAX_OUTPUT)


def _shape(item: Any) -> tuple[int, Any]:
    """(own printed size, children or None) of one object, for :func:`_size`."""
    if isinstance(item, (str, bytes, bytearray)):
        return len(item), None
    if item is None or isinstance(item, (bool, float)):
        return 8, None
    if isinstance(item, int):
        return item.bit_length() // 3 + 1, None
    if isinstance(item, dict):
        return 2 + 4 * len(item), itertools.chain(item.keys(), item.values())
    if isinstance(item, (list, tuple, set, frozenset)):
        return 2 + 2 * len(item), item
    if isinstance(item, Namespace):
        attrs = getattr(item, "_Namespace__attrs", {})
        return 16 + 4 * len(attrs), attrs.values()
    if isinstance(item, Cycler):
        return 16, item.items
    return 8, None


def _size(obj: Any, limit: int, per_level: int = 0) -> int:
    """Rough length of ``obj`` printed (str/repr/JSON), counting shared sub-objects once per reference.

    ``[x, x]`` built up in a loop is a small DAG that prints exponentially large, so each distinct container
    is sized once (memoised by id) and reused: the cost is O(distinct objects), not O(printed size). Returns
    early once the count passes ``limit``. ``per_level`` adds that many characters per element per nesting
    level (JSON indentation).
    """
    own, kids = _shape(obj)
    if kids is None:
        return own
    memo: dict[int, tuple[int, int]] = {}  # id -> (size when at depth 0, elements in the expanded tree)
    open_ids = {id(obj)}
    # Each frame: [container, size so far, elements so far, iterator over its children].
    frames: list[list[Any]] = [[obj, own, 1, iter(kids)]]
    while frames:
        frame = frames[-1]
        for child in frame[3]:
            child_own, child_kids = _shape(child)
            key = id(child)
            if child_kids is None:
                frame[1] += child_own + per_level
                frame[2] += 1
            elif key in memo:
                size, count = memo[key]
                frame[1] += size + per_level * count
                frame[2] += count
            elif key in open_ids:  # a namespace holding itself: repr prints "..."
                frame[1] += 3
                frame[2] += 1
            else:
                open_ids.add(key)
                frames.append([child, child_own, 1, iter(child_kids)])
                break
            # Every partial sum is part of the total, so passing the limit anywhere is final.
            if frame[1] > limit:
                return frame[1]
        else:
            frames.pop()
            open_ids.discard(id(frame[0]))
            memo[id(frame[0])] = (frame[1], frame[2])
            if not frames:
                return frame[1]
            parent = frames[-1]
            parent[1] += frame[1] + per_level * frame[2]
            parent[2] += frame[2]
            if parent[1] > limit:
                return parent[1]
    raise AssertionError("unreachable")


def _int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _digits_value(digits: str | None) -> int:
    if not digits:
        return 0
    # int() of a 5,000-digit string raises in Python 3.11; anything past 9 digits is over every limit anyway.
    return int(digits) if len(digits) <= 9 else 10**9


def _printf_bound(fmt: str | bytes, args: Any, limit: int) -> int:
    """Upper bound on the length of ``fmt % args``: every conversion may print the largest argument."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    if isinstance(args, Mapping):
        values = list(args.values())
    else:
        values = list(args) if isinstance(args, tuple) else [args]
    biggest = max((_size(v, limit) for v in values), default=0)
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    total = len(fmt)
    for spec in _PRINTF_SPEC.finditer(fmt):
        width = star if spec["w"] == "*" else _digits_value(spec["w"])
        precision = star if spec["p"] == "*" else _digits_value(spec["p"])
        total += max(width, precision) + biggest
        if total > limit:
            break
    return total


def _format_bound(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], limit: int) -> int:
    """Upper bound on the length of ``fmt.format(*args, **kwargs)`` (same idea as :func:`_printf_bound`)."""
    values = [*args, *kwargs.values()]
    biggest = max((_size(v, limit) for v in values), default=0)
    nested = max((abs(v) for v in values if isinstance(v, int)), default=0)
    total = len(fmt)
    for _literal, field, spec, _conversion in string.Formatter().parse(fmt):
        if field is None:
            continue
        width = max((_digits_value(d) for d in _DIGITS.findall(spec or "")), default=0)
        if spec and "{" in spec:
            width = max(width, nested)
        total += width + biggest
        if total > limit:
            break
    return total


def _replace_bound(s: str | bytes, old: str | bytes, new: str | bytes, count: Any) -> int:
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


# -- globals and filters exposed to templates ---------------------------------------------------------------


def _raise_exception(message: Any) -> NoReturn:
    # Templates use this to reject a conversation they cannot format (e.g. roles that do not alternate).
    raise TemplateError(f"chat template rejected the conversation: {_one_line(str(message))}")


def _strftime_now(format: str) -> str:  # HF's parameter name, in case a template passes it by keyword
    if not isinstance(format, str) or len(format) > 256:
        raise TemplateError("chat template refused: strftime_now() format must be a string of <= 256 chars")
    return datetime.now().strftime(format)


def _range(*args: int) -> range:
    numbers = range(*args)
    try:
        size = len(numbers)
    except OverflowError:
        size = MAX_RANGE + 1
    if size > MAX_RANGE:
        raise TemplateError(f"chat template refused: range() of more than {MAX_RANGE} items")
    return numbers


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # jinja's keyword names
    if not (0 <= n <= 100 and 0 <= min <= max <= 1000):
        raise TemplateError("chat template refused: lipsum() arguments too large")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's tojson: plain json.dumps (jinja's own one HTML-escapes and returns Markup, which changes prompts).
    if isinstance(indent, str):
        indent_width = len(indent)
    elif isinstance(indent, int) or indent is None:
        indent_width = indent or 0
    else:
        raise TemplateError("chat template refused: tojson indent must be an int or a string")
    if not 0 <= indent_width <= 16:
        raise TemplateError("chat template refused: tojson indent over 16")
    if separators is not None and (
        len(separators) != 2 or not all(isinstance(s, str) and len(s) <= 8 for s in separators)
    ):
        raise TemplateError("chat template refused: tojson separators must be two strings of <= 8 chars")
    guard = _guard()
    # Indentation repeats per nesting level per element, so size the value with that cost included.
    guard.check_size(_size(value, guard.value_limit, per_level=indent_width + 1))
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _pre_indent(guard: _Guard, arguments: dict[str, Any]) -> None:
    text, width = str(arguments["s"]), arguments["width"]
    width = width if isinstance(width, int) else len(str(width))
    guard.check_size(len(text) + (text.count("\n") + 1) * max(width, 0))


def _pre_replace(guard: _Guard, arguments: dict[str, Any]) -> None:
    # The filter stringifies its arguments before replacing.
    text, old, new = str(arguments["s"]), str(arguments["old"]), str(arguments["new"])
    guard.check_size(_replace_bound(text, old, new, arguments["count"]))


def _pre_join(guard: _Guard, arguments: dict[str, Any]) -> None:
    # Materialise once so a lazy input (map, select) can be sized, then hand the list on to the filter.
    items = list(arguments["value"])
    arguments["value"] = items
    guard.check_size(_size(items, guard.value_limit) + len(str(arguments["d"])) * len(items))


def _pre_format(guard: _Guard, arguments: dict[str, Any]) -> None:
    args = arguments["kwargs"] or arguments["args"]
    guard.check_size(_printf_bound(str(arguments["value"]), args, guard.value_limit))


# Filters whose int arguments are widths or counts of what they produce (center(10**9) allocates 1 GB).
_SIZE_FILTERS = frozenset({"center", "indent", "truncate", "batch", "slice"})

_FILTER_PRECHECKS: dict[str, Callable[[_Guard, dict[str, Any]], None]] = {
    "indent": _pre_indent,
    "replace": _pre_replace,
    "join": _pre_join,
    "format": _pre_format,
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a jinja filter with the clock, its pre-check, and a result-size check."""
    # functools.wraps copies ``jinja_pass_arg``, so jinja still passes context/environment first.
    leading = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    precheck = _FILTER_PRECHECKS.get(name)
    signature = inspect.signature(func) if precheck else None
    sized = name in _SIZE_FILTERS

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        guard = _guard()
        guard.tick()
        if sized:
            for value in itertools.chain(args[leading + 1 :], kwargs.values()):
                guard.check_count(value)
        if precheck is not None and signature is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            precheck(guard, bound.arguments)
            args, kwargs = bound.args, bound.kwargs
        result = func(*args, **kwargs)
        guard.check_value(result)
        return result

    return guarded


# -- filters the AST pass inserts (names a template is unlikely to collide with) ----------------------------


@pass_context
def _emit(context: Context, value: Any) -> Any:
    """Wraps every piece of output, in every buffer, so hidden buffers count against the size limit too."""
    guard = _guard()
    guard.tick()
    if isinstance(value, str):
        guard.write(len(value))
        return value
    guard.check_value(value)
    text = str(value)
    guard.write(len(text))
    # Objects with __html__ go back unchanged so autoescape blocks still see them as markup.
    return value if hasattr(value, "__html__") else text


@pass_context
def _concat(context: Context, parts: list[Any]) -> str:
    """``a ~ b``: sized before joining, since jinja compiles it to a bare str.join nothing else sees."""
    guard = _guard()
    guard.tick()
    guard.check_size(sum(len(p) if isinstance(p, str) else _size(p, guard.value_limit) for p in parts))
    return markup_join(parts) if context.eval_ctx.autoescape else str_join(parts)


@pass_context
def _literal(context: Context, value: Any) -> Any:
    """List/tuple/dict literals: ``[x, x]`` doubling in a loop would otherwise grow without any call."""
    guard = _guard()
    guard.tick()
    guard.check_value(value)
    return value


class _Ticking:
    """A loop's iterable that checks the clock each item: empty loop bodies make no calls to hook into."""

    __slots__ = ("_items",)

    def __init__(self, items: Any) -> None:
        self._items = items

    def __len__(self) -> int:
        # loop.length / loop.last use len() when it exists and fall back to listing on TypeError.
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        guard = _guard()
        for item in self._items:
            guard.tick()
            yield item


@pass_context
def _iterate(context: Context, value: Any) -> _Ticking:
    return _Ticking(value)


_EMIT, _CONCAT, _LITERAL, _ITERATE = "_ripelm_emit", "_ripelm_concat", "_ripelm_literal", "_ripelm_iter"


def _wrap(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _InsertCheckpoints(NodeTransformer):
    """Rewrites the parsed template so every output, loop, ``~`` and literal passes through a guard filter.

    The guards are ``pass_context`` filters, which jinja never constant-folds, so they run at render time.
    """

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        children: list[nodes.Expr] = []
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                # Literal text in a loop body is output too; keep its "safe under autoescape" meaning.
                const = nodes.Const(child.data, lineno=child.lineno)
                child = nodes.MarkSafeIfAutoescape(const, lineno=child.lineno)
            children.append(_wrap(child, _EMIT))
        node.nodes = children
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _wrap(node.iter, _ITERATE)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _wrap(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":  # tuple assignment targets are not values
            return node
        return _wrap(node, _LITERAL)

    visit_List = visit_Tuple = visit_Dict = _literal


class _GenerationTag(Extension):
    """HF's ``{% generation %}`` marks assistant text for training masks; for inference it is a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox plus the checks described in the module docstring."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, type) and attr in _MUTATING_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        # jinja returns an Undefined that only fails when used; `{{ x.__class__ }}` would print "" and
        # hide the probe. Refuse at the access instead.
        raise SecurityError(f"access to unsafe attribute {attribute!r} of {type(obj).__name__}")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        template: str = value.__self__
        is_format_map = value.__name__ == "format_map"

        @functools.wraps(sandboxed)
        def checked(*args: Any, **kwargs: Any) -> str:
            guard = _guard()
            guard.tick()
            mapping = args[0] if is_format_map and args and isinstance(args[0], Mapping) else kwargs
            positional = () if is_format_map else args
            for number in itertools.chain(positional, mapping.values()):
                guard.check_count(number)
            guard.check_size(_format_bound(template, positional, mapping, guard.value_limit))
            return sandboxed(*args, **kwargs)

        return checked

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        guard = _guard()
        guard.tick()
        limit = guard.value_limit
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if _int_bits(left) + _int_bits(right) > _MAX_INT_BITS:
                    raise TemplateError("chat template refused: integer too large")
            else:
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(times, int) and isinstance(seq, (str, bytes, list, tuple)):
                    guard.check_size(_size(seq, limit) * max(times, 0))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if _int_bits(left) * right > _MAX_INT_BITS:
                    raise TemplateError("chat template refused: integer too large")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and type(left) is type(right):
                guard.check_size(_size(left, limit) + _size(right, limit))
        elif operator == "%" and isinstance(left, (str, bytes)):
            guard.check_size(_printf_bound(left, right, limit))
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        guard = _guard()
        guard.tick()
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, types.BuiltinMethodType) and isinstance(owner, (str, bytes, bytearray)):
            args = self._check_str_method(guard, owner, obj.__name__, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        guard.tick()
        guard.check_value(result)
        return result

    @staticmethod
    def _check_str_method(
        guard: _Guard,
        owner: str | bytes | bytearray,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Any, ...]:
        if name in _REFUSED_STR_METHODS:
            raise TemplateError(f"chat template refused: str.{name}() is not allowed")
        for value in itertools.chain(args, kwargs.values()):
            guard.check_count(value)
        if name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            if isinstance(args[0], type(owner)) and isinstance(args[1], type(owner)):
                guard.check_size(_replace_bound(owner, args[0], args[1], count))
        elif name == "join" and len(args) == 1:
            items = list(args[0])
            guard.check_size(_size(items, guard.value_limit) + len(owner) * len(items))
            return (items,)
        return args


def _make_environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    for name in _REMOVED_FILTERS:
        env.filters.pop(name, None)
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, func) for name, func in env.filters.items()}
    env.filters.update({_EMIT: _emit, _CONCAT: _concat, _LITERAL: _literal, _ITERATE: _iterate})
    env.globals.update(
        range=_range, lipsum=_lipsum, raise_exception=_raise_exception, strftime_now=_strftime_now
    )
    return env


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _translate(exc: BaseException) -> TemplateError:
    """Map whatever a render raised to one TemplateError with a one-line message."""
    if isinstance(exc, SecurityError):
        return TemplateError(f"chat template refused: {_one_line(str(exc))}")
    if isinstance(exc, TemplateSyntaxError):
        return TemplateError(
            f"chat template syntax error on line {exc.lineno}: {_one_line(exc.message or '')}"
        )
    if isinstance(exc, jinja2.TemplateError):
        return TemplateError(f"chat template error: {_one_line(str(exc))}")
    if isinstance(exc, RecursionError):
        return TemplateError("chat template nested or recursed too deeply")
    if isinstance(exc, MemoryError):
        return TemplateError("chat template ran out of memory")
    return TemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(str(exc))}")


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
        self._env = _make_environment()
        token = _GUARD.set(_Guard(self.time_limit, self.max_output))
        try:
            tree = self._env.parse(self.source)
            tree = _InsertCheckpoints().visit(tree)
            tree.set_environment(self._env)
            self._template = self._env.from_string(tree)
        except TemplateError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc
        finally:
            _GUARD.reset(token)

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
        guard = _Guard(self.time_limit, self.max_output)
        token = _GUARD.set(guard)
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
            _GUARD.reset(token)
