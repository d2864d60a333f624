"""The jinja sandbox chat templates render in: an ImmutableSandboxedEnvironment hardened for untrusted
GGUF templates (unsafe attributes raise, mutation through types refused, bounded range/lipsum, every
loop/call/filter/output a time and size checkpoint; see `chat_template` for the threat)."""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import types
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import nodes, pass_context
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from ripelm.runtime.template_limits import (
    MAX_INT_BITS,
    Guard,
    TemplateError,
    current_guard,
    format_bound,
    int_bits,
    one_line,
    printf_bound,
    replace_bound,
    value_size,
)

# jinja's own sandbox bound on range(); a chat template iterates over messages, not millions of ints.
MAX_RANGE = 100_000
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


def _raise_exception(message: Any) -> NoReturn:
    # Templates use this to reject a conversation they cannot format (e.g. roles that do not alternate).
    raise TemplateError(f"chat template rejected the conversation: {one_line(str(message))}")


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
    guard = current_guard()
    # Indentation repeats per nesting level per element, so size the value with that cost included.
    guard.check_size(value_size(value, guard.value_limit, per_level=indent_width + 1))
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _pre_indent(guard: Guard, arguments: dict[str, Any]) -> None:
    text, width = str(arguments["s"]), arguments["width"]
    width = width if isinstance(width, int) else len(str(width))
    guard.check_size(len(text) + (text.count("\n") + 1) * max(width, 0))


def _pre_replace(guard: Guard, arguments: dict[str, Any]) -> None:
    # The filter stringifies its arguments before replacing.
    text, old, new = str(arguments["s"]), str(arguments["old"]), str(arguments["new"])
    guard.check_size(replace_bound(text, old, new, arguments["count"]))


def _pre_join(guard: Guard, arguments: dict[str, Any]) -> None:
    # Materialise once so a lazy input (map, select) can be sized, then hand the list on to the filter.
    items = list(arguments["value"])
    arguments["value"] = items
    guard.check_size(value_size(items, guard.value_limit) + len(str(arguments["d"])) * len(items))


def _pre_format(guard: Guard, arguments: dict[str, Any]) -> None:
    args = arguments["kwargs"] or arguments["args"]
    guard.check_size(printf_bound(str(arguments["value"]), args, guard.value_limit))


# Filters whose int arguments are widths or counts of what they produce (center(10**9) allocates 1 GB).
_SIZE_FILTERS = frozenset({"center", "indent", "truncate", "batch", "slice"})

_FILTER_PRECHECKS: dict[str, Callable[[Guard, dict[str, Any]], None]] = {
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
        guard = current_guard()
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
    guard = current_guard()
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
    guard = current_guard()
    guard.tick()
    guard.check_size(sum(len(p) if isinstance(p, str) else value_size(p, guard.value_limit) for p in parts))
    return markup_join(parts) if context.eval_ctx.autoescape else str_join(parts)


@pass_context
def _literal(context: Context, value: Any) -> Any:
    """List/tuple/dict literals: ``[x, x]`` doubling in a loop would otherwise grow without any call."""
    guard = current_guard()
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
        guard = current_guard()
        for item in self._items:
            guard.tick()
            yield item


@pass_context
def _iterate(context: Context, value: Any) -> _Ticking:
    return _Ticking(value)


_EMIT, _CONCAT, _LITERAL, _ITERATE = "_ripelm_emit", "_ripelm_concat", "_ripelm_literal", "_ripelm_iter"


def _wrap(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class InsertCheckpoints(NodeTransformer):
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
            guard = current_guard()
            guard.tick()
            mapping = args[0] if is_format_map and args and isinstance(args[0], Mapping) else kwargs
            positional = () if is_format_map else args
            for number in itertools.chain(positional, mapping.values()):
                guard.check_count(number)
            guard.check_size(format_bound(template, positional, mapping, guard.value_limit))
            return sandboxed(*args, **kwargs)

        return checked

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        guard = current_guard()
        guard.tick()
        limit = guard.value_limit
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if int_bits(left) + int_bits(right) > MAX_INT_BITS:
                    raise TemplateError("chat template refused: integer too large")
            else:
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(times, int) and isinstance(seq, (str, bytes, list, tuple)):
                    guard.check_size(value_size(seq, limit) * max(times, 0))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if int_bits(left) * right > MAX_INT_BITS:
                    raise TemplateError("chat template refused: integer too large")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and type(left) is type(right):
                guard.check_size(value_size(left, limit) + value_size(right, limit))
        elif operator == "%" and isinstance(left, (str, bytes)):
            guard.check_size(printf_bound(left, right, limit))
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        guard = current_guard()
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
        guard: Guard,
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
                guard.check_size(replace_bound(owner, args[0], args[1], count))
        elif name == "join" and len(args) == 1:
            items = list(args[0])
            guard.check_size(value_size(items, guard.value_limit) + len(owner) * len(items))
            return (items,)
        return args


def make_environment() -> _Sandbox:
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
