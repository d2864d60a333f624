"""The tools a chat can offer the model: each with an OpenAI-style function schema, whether it is on by
default, and whether the user must confirm each call; a chat's `ToolBox` holds the ones it turned on.

Only harmless tools are on by default (the date and time, searching the attached documents); reading
files, running shell commands and MCP servers are turned on per chat (`/tools on NAME` in the chat) or for
every chat in config.toml (`[tools] on = [...]`). A call's arguments are checked against the tool's schema
(jsonschema) before it runs; a call of a tool that is off, unknown or badly formed is answered with one
line saying so, which goes back to the model like any result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ripelm.assistant_tools.files import ToolRefused

Runner = Callable[[dict[str, Any]], str]
# asked before a tool that needs confirmation runs: (tool, arguments) -> True to run it
Confirm = Callable[["Tool", dict[str, Any]], bool]
RESULT_CHARS = 16_000  # a tool result handed to the model at most


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    run: Runner
    default_on: bool = False
    confirm: bool = False  # the user confirms each call (its exact arguments) before it runs
    group: str = "builtin"  # "builtin", or the MCP server's name (turning the server on turns all on)

    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolResult:
    name: str
    arguments: dict[str, Any]
    content: str
    ok: bool = True  # False: refused or failed (content says why)
    refused: bool = False  # the user (or the sandbox) said no


def call_label(name: str, arguments: dict[str, Any]) -> str:
    """`name(key="value", ...)`, the call as shown in the app."""
    args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    return f"{name}({args})"


@dataclass
class ToolBox:
    """The tools known to a chat and which of them are on."""

    tools: dict[str, Tool] = field(default_factory=dict)
    on: set[str] = field(default_factory=set)

    def add(self, tool: Tool) -> None:
        self.tools[tool.name] = tool

    def set(self, name: str, enabled: bool) -> list[str]:
        """Turn a tool, or every tool of an MCP server (its name), on or off; returns the names changed.
        KeyError for a name that is neither."""
        names = [name] if name in self.tools else [t.name for t in self.tools.values() if t.group == name]
        if not names:
            raise KeyError(name)
        for n in names:
            (self.on.add if enabled else self.on.discard)(n)
        return names

    def offered(self) -> list[Tool]:
        return [t for n, t in self.tools.items() if n in self.on]

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.offered()]

    def call(self, name: str, arguments: Any, confirm: Confirm | None = None) -> ToolResult:
        """Run one call; every failure becomes a result saying what went wrong (never an exception)."""
        args = arguments if isinstance(arguments, dict) else {}
        tool = self.tools.get(name)
        if tool is None or name not in self.on:
            why = "is not turned on in this chat" if tool is not None else "does not exist"
            return ToolResult(name, args, f"the tool '{name}' {why}", ok=False)
        if not isinstance(arguments, dict):
            return ToolResult(name, args, "the arguments must be a JSON object", ok=False)
        problem = _schema_problem(tool.parameters, args)
        if problem:
            return ToolResult(name, args, f"bad arguments for {name}: {problem}", ok=False)
        if tool.confirm and (confirm is None or not confirm(tool, args)):
            return ToolResult(name, args, "the user declined to run this", ok=False, refused=True)
        try:
            content = tool.run(args)
        except ToolRefused as e:
            return ToolResult(name, args, str(e), ok=False, refused=True)
        except Exception as e:  # a tool's own failure goes back to the model, not up the stack
            return ToolResult(name, args, f"{name} failed: {e or type(e).__name__}", ok=False)
        if len(content) > RESULT_CHARS:
            content = content[:RESULT_CHARS] + f"\n[… cut at {RESULT_CHARS} characters]"
        return ToolResult(name, args, content)


def _schema_problem(schema: dict[str, Any], args: dict[str, Any]) -> str | None:
    import jsonschema

    try:
        jsonschema.validate(args, schema)
    except jsonschema.ValidationError as e:
        return e.message
    except jsonschema.SchemaError:
        return None  # a server's odd schema is its own business: the call goes to it as it is
    return None
