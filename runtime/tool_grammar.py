"""Grammars that force a valid tool call: for `tool_choice` "required" or a named function, so that even a
small model emits a call in its family's syntax whose arguments follow the tool's JSON schema.

A call is one JSON object `{"name": <const>, "arguments": <the tool's parameters schema>}` (Llama 3 names the
arguments "parameters"); with several tools it is any one of them. Around it goes the family's syntax
(`<tool_call>` blocks, `[TOOL_CALLS][...]`, `;`-separated objects). Two forms of the same grammar: Lark
with an embedded `%json` schema for llguidance (the native engine), and GBNF for llama.cpp, where
llama-cpp-python's own converter turns the call schema into rules.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ripelm.runtime.errors import BadSamplingError

# (first call's prefix, between calls, after the last call) per family; generic writes the hermes form.
_FRAMES = {
    "hermes": ("<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>"),
    "generic": ("<tool_call>\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>"),
    "mistral": ("[TOOL_CALLS][", ", ", "]"),
    "llama3": ("", "; ", ""),
}


def chosen_tools(tools: list[dict], choice: Any) -> list[dict]:
    """The tools a call may use: all for "required", the one named for {"type": "function", ...}."""
    if choice == "required":
        return tools
    name = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
    picked = [t for t in tools if t["function"]["name"] == name]
    if not picked:
        raise BadSamplingError(f"tool_choice names {name!r}, which is not one of the tools")
    return picked


def call_schema(tools: list[dict], args_key: str = "arguments") -> dict:
    """JSON schema of one call to any of `tools`."""
    options = []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key],
            "additionalProperties": False,
        })  # fmt: skip
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(family: str, tools: list[dict], choice: Any, *, parallel: bool = True,
                 syntax: str = "lark") -> tuple[str, str]:  # fmt: skip
    """(kind, text): a grammar for one call (or, with `parallel` and "required", one or more) of `choice`."""
    picked = chosen_tools(tools, choice)
    schema = call_schema(picked, "parameters" if family == "llama3" else "arguments")
    first, between, last = _FRAMES[family]
    many = parallel and choice == "required"
    if syntax == "lark":  # JSON written as the templates write it; flexible blanks let a weak model loop
        schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                           "key_separator": ": "}}  # fmt: skip
        rest = f" ({json.dumps(between)} call)*" if many else ""
        start = " ".join(p for p in (_lit(first), "call" + rest, _lit(last)) if p)
        return "lark", f"start: {start}\ncall: %json {json.dumps(schema)}\n"
    if syntax == "gbnf":
        from ripelm.runtime.llama_cpp_backend import json_schema_gbnf

        rules = json_schema_gbnf(json.dumps(schema))
        rules = re.sub(r"^root ::=", "tool-call ::=", rules, flags=re.M)
        rest = f" ({json.dumps(between)} tool-call)*" if many else ""
        root = " ".join(p for p in (_lit(first), "tool-call" + rest, _lit(last)) if p)
        return "gbnf", f"root ::= {root}\n{rules}"
    raise ValueError(f"unknown grammar syntax {syntax!r}")


def _lit(text: str) -> str:
    return json.dumps(text) if text else ""
