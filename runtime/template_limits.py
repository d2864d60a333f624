"""Time and size limits for rendering an untrusted chat template (see `chat_template`).

A `Guard` holds one render's budget and is reached from jinja callbacks through the `GUARD` context
variable. The `*_bound` helpers predict how large a string operation's result would be *before* it runs,
so a template cannot allocate a huge value in one uninterruptible C call.
"""

from __future__ import annotations

import itertools
import re
import string
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from jinja2.utils import Cycler, Namespace

from ripelm.models.errors import RipelmError

DEFAULT_TIME_LIMIT = 2.0
DEFAULT_MAX_OUTPUT = 1_000_000
# Intermediate values may be larger than the final output (a template can build a string and trim it), but
# not unboundedly: this many times max_output, in characters (containers count roughly their repr length).
_VALUE_FACTOR = 4
# Ints bigger than this are refused in * and **: no chat template needs 2,500-digit numbers, and a huge int
# costs time and memory in a single uninterruptible C call.
MAX_INT_BITS = 8192
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?P<w>\*|\d+)?(?:\.(?P<p>\*|\d*))?[hlL]?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")


class TemplateError(RipelmError):
    """A chat template was refused, failed, or exceeded a limit while rendering."""


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace and cut to `limit` characters: error messages stay one line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Guard:
    """The limits of one render; reached from jinja callbacks through ``GUARD``."""

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
        self.check_size(len(value) if isinstance(value, str) else value_size(value, self.value_limit))

    def check_count(self, value: Any) -> None:
        """An int passed as a width/count/repeat argument may not exceed what could ever fit in a value."""
        if isinstance(value, int) and abs(value) > self.value_limit:
            raise TemplateError(f"chat template refused: argument {value} is over the size limit")

    def write(self, size: int) -> None:
        self.work += size
        if self.work > self.work_limit:
            raise TemplateError(f"chat template wrote more than {self.work_limit} characters")


GUARD: ContextVar[Guard] = ContextVar("ripelm_chat_template_guard")


def current_guard() -> Guard:
    guard = GUARD.get(None)
    # Only reachable if jinja evaluates a callback outside render()/compile; keep size checks working.
    return guard if guard is not None else Guard(DEFAULT_TIME_LIMIT, DEFAULT_MAX_OUTPUT)


def _shape(item: Any) -> tuple[int, Any]:
    """(own printed size, children or None) of one object, for :func:`value_size`."""
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


def value_size(obj: Any, limit: int, per_level: int = 0) -> int:
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


def int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _digits_value(digits: str | None) -> int:
    if not digits:
        return 0
    # int() of a 5,000-digit string raises in Python 3.11; anything past 9 digits is over every limit anyway.
    return int(digits) if len(digits) <= 9 else 10**9


def printf_bound(fmt: str | bytes, args: Any, limit: int) -> int:
    """Upper bound on the length of ``fmt % args``: every conversion may print the largest argument."""
    if isinstance(fmt, bytes):
        fmt = fmt.decode("latin-1")
    if isinstance(args, Mapping):
        values = list(args.values())
    else:
        values = list(args) if isinstance(args, tuple) else [args]
    biggest = max((value_size(v, limit) for v in values), default=0)
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    total = len(fmt)
    for spec in _PRINTF_SPEC.finditer(fmt):
        width = star if spec["w"] == "*" else _digits_value(spec["w"])
        precision = star if spec["p"] == "*" else _digits_value(spec["p"])
        total += max(width, precision) + biggest
        if total > limit:
            break
    return total


def format_bound(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], limit: int) -> int:
    """Upper bound on the length of ``fmt.format(*args, **kwargs)`` (same idea as :func:`printf_bound`)."""
    values = [*args, *kwargs.values()]
    biggest = max((value_size(v, limit) for v in values), default=0)
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


def replace_bound(s: str | bytes, old: str | bytes, new: str | bytes, count: Any) -> int:
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


# -- globals and filters exposed to templates ---------------------------------------------------------------
