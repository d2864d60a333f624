"""Tool settings from config.toml and a chat's own choices, and the `ToolBox` a chat's reply gets.

config.toml::

    [tools]
    on = ["read_file", "list_files"]   # on in every chat, besides the harmless defaults (a tool's name,
                                       #   or an MCP server's name for all its tools)
    off = ["current_datetime"]         # off in every chat
    folders = ["~/notes"]              # read_file / list_files read only under these
    max_calls = 5                      # tool calls per reply; the loop is cut there
    max_file_kb = 64                   # a file's text handed to the model at most
    shell_timeout = 30                 # seconds a confirmed shell command may run

    [mcp.servers.weather]              # an MCP server over stdio, its tools offered (off until turned on)
    command = "uvx"
    args = ["mcp-weather"]
    env = { API_KEY = "..." }

A chat's own choices (`/tools on NAME`, `/tools off NAME` in the chat) are kept with the chat (its
settings, key "tools": name -> on) and win over the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ripelm.assistant_tools.builtin import DocumentSearch, datetime_tool, file_tools, shell_tool
from ripelm.assistant_tools.files import MAX_FILE_BYTES, FileSandbox
from ripelm.assistant_tools.registry import ToolBox

if TYPE_CHECKING:  # the MCP client (asyncio, the SDK) loads when the chat app makes its ChatTools
    from ripelm.assistant_tools.mcp_client import McpServers

MAX_CALLS = 5
CHAT_KEY = "tools"  # where a chat's own tool choices live in its settings (Chat.params)


@dataclass
class McpServerConfig:
    name: str
    command: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None


@dataclass
class ToolSettings:
    on: list[str] = field(default_factory=list)
    off: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    max_calls: int = MAX_CALLS
    max_file_bytes: int = MAX_FILE_BYTES
    shell_timeout_s: float = 30.0
    mcp: list[McpServerConfig] = field(default_factory=list)


def parse_tool_config(tools: Any, mcp: Any, where: str, error: type[Exception]) -> ToolSettings:
    """`[tools]` and `[mcp]` of config.toml (already parsed); `error(message)` for a bad setting."""
    s = ToolSettings()
    tools = {} if tools is None else tools
    if not isinstance(tools, dict):
        raise error(f"{where}: [tools] must be a table")
    tools = dict(tools)
    for key in ("on", "off", "folders"):
        value = tools.pop(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise error(f"{where} [tools]: '{key}' must be a list of strings")
        setattr(s, key, value)
    for key, attr, scale in (("max_calls", "max_calls", 1), ("max_file_kb", "max_file_bytes", 1024),
                             ("shell_timeout", "shell_timeout_s", 1)):  # fmt: skip
        value = tools.pop(key, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
            raise error(f"{where} [tools]: '{key}' must be a number >= 1")
        setattr(s, attr, type(getattr(s, attr))(value * scale))
    if tools:
        raise error(f"{where}: unknown settings: {', '.join('tools.' + k for k in tools)}")
    mcp = {} if mcp is None else mcp
    servers = mcp.get("servers", {}) if isinstance(mcp, dict) else None
    if not isinstance(servers, dict) or any(k != "servers" for k in mcp):
        raise error(f"{where}: [mcp] holds only [mcp.servers.NAME] tables")
    for name, table in servers.items():
        w = f"{where} [mcp.servers.{name}]"
        if not isinstance(table, dict) or not isinstance(table.get("command"), str):
            raise error(f'{w}: needs command = "program"')
        args, env, cwd = table.get("args", []), table.get("env"), table.get("cwd")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise error(f"{w}: 'args' must be a list of strings")
        if env is not None and (
            not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values())
        ):
            raise error(f"{w}: 'env' must map names to strings")
        if cwd is not None and not isinstance(cwd, str):
            raise error(f"{w}: 'cwd' must be a string")
        unknown = set(table) - {"command", "args", "env", "cwd"}
        if unknown:
            raise error(f"{w}: unknown settings: {', '.join(sorted(unknown))}")
        s.mcp.append(McpServerConfig(name, table["command"], list(args), env, cwd))
    return s


def chat_choices(params: dict[str, Any]) -> dict[str, bool]:
    value = params.get(CHAT_KEY)
    return {k: bool(v) for k, v in value.items()} if isinstance(value, dict) else {}


@dataclass
class ChatTools:
    """What the app needs for tools: the settings and the MCP servers (started when first turned on)."""

    settings: ToolSettings
    mcp: McpServers

    @classmethod
    def from_settings(cls, settings: ToolSettings, log_path: Path | None = None) -> ChatTools:
        from ripelm.assistant_tools.mcp_client import McpServers

        return cls(settings, McpServers(settings.mcp, log_path))

    def toolbox(
        self,
        params: dict[str, Any],
        collection: str | None,
        on_sources: Callable[[list[Any]], None] | None = None,
        notice: Callable[[str], None] | None = None,
        start_mcp: bool = True,
    ) -> tuple[ToolBox, DocumentSearch | None]:
        """The tools of a chat (its settings `params` and attached collection), those it turned on marked
        on. MCP servers that are on are started here (call it off the UI thread); one that fails is
        reported through `notice` and left out."""
        from ripelm.assistant_tools.mcp_client import McpError

        s = self.settings
        box = ToolBox()
        box.add(datetime_tool())
        search = DocumentSearch(collection, on_sources) if collection else None
        if search is not None:
            box.add(search.tool())
        for tool in file_tools(FileSandbox([Path(f) for f in s.folders], max_bytes=s.max_file_bytes)):
            box.add(tool)
        cwd = Path(s.folders[0]).expanduser() if s.folders else None
        box.add(shell_tool(cwd if cwd is not None and cwd.is_dir() else None, s.shell_timeout_s))
        choices = {**{n: True for n in s.on}, **{n: False for n in s.off}, **chat_choices(params)}
        for server in self.mcp.names() if start_mcp else []:
            if choices.get(server) or any(choices.get(n) for n in choices if n.startswith(server + "__")):
                try:
                    for tool in self.mcp.start(server):
                        box.add(tool)
                except McpError as e:
                    if notice is not None:
                        notice(str(e))
        box.on = {n for n, t in box.tools.items() if t.default_on}
        for name, enabled in choices.items():
            try:
                box.set(name, enabled)
            except KeyError:
                pass  # a tool of a server that is not running, or one no longer known
        return box, search

    def chosen(self, params: dict[str, Any]) -> bool:
        """Whether the user turned any tool on himself (config `on`, or this chat's `/tools on`)."""
        return bool(self.settings.on) or any(chat_choices(params).values())

    def known(self) -> list[tuple[str, str, bool]]:
        """(name, description, on by default) of every tool and MCP server, for `/tools`."""
        box, _ = self.toolbox({}, "documents", start_mcp=False)
        rows = [(t.name, t.description, t.default_on) for t in box.tools.values()]
        for server in self.mcp.names():
            rows.append((server, f"MCP server ({self.mcp.configs[server].command})", False))
        return rows

    def close(self) -> None:
        self.mcp.close()
