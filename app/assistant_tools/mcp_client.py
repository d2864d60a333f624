"""MCP servers over stdio (from config.toml's `[mcp.servers.NAME]`), through the `mcp` SDK's client.

Each server runs as a child process with a session held open on one background asyncio loop (the SDK's
stdio transport and session are async context managers that must be entered and left in the same task, so
one task per server keeps them open until `close`). The app's worker threads call tools through
`run_coroutine_threadsafe`. A server's tools are offered to the model as `<server>__<tool>` (OpenAI
function names allow no dots), grouped under the server's name so `/tools on <server>` turns them all on.
The servers' stderr goes to a log file in the data dir, never onto the app's screen.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from ripelm.assistant_tools.registry import Tool
from ripelm.assistant_tools.settings import McpServerConfig
from ripelm.errors import McpError

START_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 60.0


def _text(result: Any) -> tuple[str, bool]:
    parts = []
    for block in getattr(result, "content", []) or []:
        text = getattr(block, "text", None)
        parts.append(text if text is not None else f"[{getattr(block, 'type', 'content')} not shown]")
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if not parts and structured is not None:
        import json

        parts.append(json.dumps(structured, ensure_ascii=False))
    failed = bool(getattr(result, "is_error", None) or getattr(result, "isError", None))
    return "\n".join(parts), failed


class McpServers:
    """The configured servers; `start(name)` launches one (once) and returns its tools."""

    def __init__(self, configs: list[McpServerConfig], log_path: Path | None = None):
        self.configs = {c.name: c for c in configs}
        self.log_path = log_path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._sessions: dict[str, Any] = {}
        self._tools: dict[str, list[Tool]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: list[Any] = []

    def names(self) -> list[str]:
        return list(self.configs)

    def started(self, name: str) -> bool:
        return name in self._tools

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="ripelm-mcp", daemon=True).start()
        return self._loop

    def start(self, name: str) -> list[Tool]:
        """Launch server `name` if it is not running and list its tools (McpError if it cannot)."""
        with self._lock:
            if name in self._tools:
                return self._tools[name]
            if name not in self.configs:
                raise McpError(f"no MCP server named '{name}' in config.toml")
            loop = self._ensure_loop()
            ready: asyncio.Future = asyncio.run_coroutine_threadsafe(self._ready_future(), loop).result()
            self._tasks.append(asyncio.run_coroutine_threadsafe(self._serve(self.configs[name], ready), loop))
            try:
                listed = asyncio.run_coroutine_threadsafe(self._await(ready), loop).result(START_TIMEOUT_S)
            except McpError:
                raise
            except Exception as e:
                raise McpError(f"MCP server '{name}' did not start: {e or type(e).__name__}") from None
            tools = [self._tool(name, t) for t in listed]
            self._tools[name] = tools
            return tools

    async def _ready_future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    async def _await(self, fut: asyncio.Future) -> Any:
        return await fut

    async def _serve(self, cfg: McpServerConfig, ready: asyncio.Future) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        params = StdioServerParameters(command=cfg.command, args=cfg.args, env=cfg.env, cwd=cfg.cwd)
        stop = asyncio.Event()
        self._stops[cfg.name] = stop
        log = open(self.log_path, "a", encoding="utf-8") if self.log_path else open("/dev/null", "w")  # noqa: SIM115
        try:
            async with (
                stdio_client(params, errlog=log) as streams,
                ClientSession(streams[0], streams[1]) as s,
            ):
                await s.initialize()
                listed = await s.list_tools()
                self._sessions[cfg.name] = s
                ready.set_result(list(listed.tools))
                await stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(
                    McpError(f"MCP server '{cfg.name}' did not start: {e or type(e).__name__}")
                )
            if not isinstance(e, Exception):
                raise
        finally:
            self._sessions.pop(cfg.name, None)
            log.close()

    def _tool(self, server: str, t: Any) -> Tool:
        schema = getattr(t, "input_schema", None) or getattr(t, "inputSchema", None) or {"type": "object"}
        return Tool(
            f"{server}__{t.name}",
            t.description or f"{t.name} (MCP server {server})",
            dict(schema),
            lambda args, _name=t.name: self.call(server, _name, args),
            group=server,
        )

    def call(self, server: str, tool: str, args: dict[str, Any]) -> str:
        session = self._sessions.get(server)
        if session is None or self._loop is None:
            raise McpError(f"the MCP server '{server}' is not running")
        fut = asyncio.run_coroutine_threadsafe(session.call_tool(tool, args), self._loop)
        try:
            result = fut.result(CALL_TIMEOUT_S)
        except TimeoutError:
            fut.cancel()
            raise McpError(
                f"the MCP server '{server}' did not answer within {CALL_TIMEOUT_S:.0f} s"
            ) from None
        text, failed = _text(result)
        return f"[the tool reported an error]\n{text}" if failed else text

    def close(self) -> None:
        """Stop every server (their processes end with their sessions)."""
        loop = self._loop
        if loop is None:
            return
        for stop in list(self._stops.values()):
            loop.call_soon_threadsafe(stop.set)
        for task in self._tasks:
            try:
                task.result(5.0)
            except Exception:  # a server that will not stop cleanly is killed by the SDK's transport
                pass
        loop.call_soon_threadsafe(loop.stop)
        self._loop = None
        self._tools.clear()
