"""Tools in the chat app: `/tools` (list, `on NAME`, `off NAME`) and a reply generated through the tool
loop (`ripelm.tool_loop`), each call shown as a collapsed block above the reply, a shell command run only
after the user confirms it in a dialog, Esc stopping the loop.

A mixin of `RipeApp` (app.py), kept apart so the streaming core stays small. The reply worker runs on a
thread: it builds the chat's `ToolBox` there (an MCP server turned on starts then), runs the loop and posts
text, call and result messages to the UI thread, which shows them and stores the reply as it streams. A
chat with a document collection whose search tool the user turned off answers as before (passages
retrieved for every question, `_generate`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from textual import work
from textual.containers import VerticalScroll

from ripelm.assistant_tools.registry import Tool, ToolResult, call_label
from ripelm.assistant_tools.settings import CHAT_KEY, ChatTools, chat_choices
from ripelm.doc_qa import CitationFilter
from ripelm.tool_loop import Forced, ToolLoop
from ripelm.tui.messages import ReplyDelta, ReplyDone, ReplySources
from ripelm.tui.status_bar import StatusBar
from ripelm.tui.tool_views import ConfirmCommand, ToolCallFinished, ToolCallStarted, ToolCallView

TOOLS_HELP = (
    "/tools lists the tools; /tools on NAME and /tools off NAME turn one on or off in this chat; "
    "/tools call NAME makes the next reply call it first (for models too small to choose)"
)


class ToolTurns:
    chat_tools: ChatTools | None
    tool_force: Forced | None = None  # force calls by grammar (models too small to choose; tests)
    force_next: Forced | None = None  # `/tools call NAME`: the next reply calls NAME first
    tool_loops: list[ToolLoop]  # every loop run in this session (the last is the current reply's)
    store: Any
    chat: Any
    reply: Any
    pool: Any

    # ---- /tools ----------------------------------------------------------------------------------------
    async def tools_command(self, text: str) -> bool:
        """Handle `/tools ...` typed in the prompt; False when the text is not one (it is sent as usual)."""
        parts = text.split()
        if not parts or parts[0] != "/tools":
            return False
        if self.chat_tools is None or self.chat is None:
            self.notify("tools are not available in this session", severity="warning")
            return True
        if len(parts) == 1:
            self._list_tools(self.chat.params, self.chat.collection)
            return True
        if len(parts) == 3 and parts[1] == "call":
            self.force_next = Forced({"type": "function", "function": {"name": parts[2]}}, rounds=1)
            self.notify(f"the next reply calls {parts[2]} first")
            return True
        if len(parts) != 3 or parts[1] not in ("on", "off"):
            self.notify(TOOLS_HELP, severity="warning")
            return True
        name, enabled = parts[2], parts[1] == "on"
        known = {n for n, _, _ in self.chat_tools.known()}
        if name not in known and name.split("__")[0] not in self.chat_tools.mcp.names():
            self.notify(f"no tool or MCP server named '{name}' ({TOOLS_HELP})", severity="error")
            return True
        params = dict(self.chat.params)
        params[CHAT_KEY] = {**chat_choices(params), name: enabled}
        self.chat = self.store.update_chat(self.chat.id, params=params)
        self.notify(f"{name} is {'on' if enabled else 'off'} in this chat")
        if enabled and name in self.chat_tools.mcp.names():
            self._list_tools(self.chat.params, self.chat.collection)  # starts the server and shows its tools
        return True

    @work(thread=True, group="tools")
    def _list_tools(self, params: dict[str, Any], collection: str | None) -> None:
        errors: list[str] = []
        box, _ = self.chat_tools.toolbox(params, collection, notice=errors.append)
        lines = [f"{'on ' if n in box.on else 'off'}  {n}" for n in box.tools]
        lines += [
            f"off  {s} (MCP server)"
            for s in self.chat_tools.mcp.names()
            if not self.chat_tools.mcp.started(s)
        ]
        self.tools_listed = box
        self.call_from_thread(self.notify, "\n".join(lines + errors), title="tools in this chat", timeout=12)

    # ---- a reply through the tool loop -------------------------------------------------------------------
    @work(thread=True, exclusive=False, group="generation")
    def generate_with_tools(
        self, reply: Any, chat: Any, turns: list[dict[str, Any]], params: Any, found: Any = None
    ) -> None:
        """A reply through the tool loop, with the memories `found` recalled in front of the message. A local
        model whose template knows no tools (the generic family, e.g. the bundled SmolLM2) is offered only
        the tools the user turned on himself (config `on`, `/tools on`, `/tools call`): a list of default
        tools in every prompt costs ~100 tokens and leads a small model to recite it."""
        citations: CitationFilter | None = None

        def sources_found(sources: list[Any]) -> None:
            nonlocal citations
            from ripelm.chat_docs import source_records

            citations = CitationFilter({s.number for s in sources})
            self.post_message(ReplySources(reply.id, source_records(sources)))

        try:
            notices: list[str] = []
            box, search = self.chat_tools.toolbox(chat.params, chat.collection, sources_found, notices.append)
            for n in notices:
                self.call_from_thread(self.notify, n, severity="warning")
            plain = (reply, chat.model, chat.draft, chat.collection, turns, params, found)
            if chat.collection and (search is None or search.tool().name not in box.on):
                self.call_from_thread(self._generate, *plain)
                return
            if self.pool.current() is None or (chat.model, chat.draft) != self.pool.key:
                self.call_from_thread(self.query_one(StatusBar).show, engine="loading…")
            backend = self.pool.get(chat.model, chat.draft)
            reply.remote = bool(backend.caps.takes_messages)
            if not reply.remote and not (self.tool_force or self.force_next) and not self.chat_tools.chosen(
                chat.params
            ):
                from ripelm.runtime.tool_calls import parser_for

                if parser_for(backend.template.source, getattr(backend, "arch", None)).family == "generic":
                    self.call_from_thread(self._generate, *plain)
                    return
            turns = self.recall_into(turns, found, backend, reply)
            loop = ToolLoop(
                backend, turns, params, box,
                max_calls=self.chat_tools.settings.max_calls,
                confirm=lambda tool, args: self._confirm_call(reply, tool, args),
                force=self.tool_force or self.force_next,
                on_trim=lambda n: self.call_from_thread(self._trimmed, n),
            )  # fmt: skip
            self.force_next = None
            self.tool_loops.append(loop)
            reply.generation = loop
            if reply.cancel_pressed is not None:
                loop.cancel()
            pending, posted, first, tokens = "", 0.0, None, 0
            for ev in loop.events():
                if ev.kind == "text":
                    text = citations.feed(ev.text) if citations is not None else ev.text
                    now = time.perf_counter()
                    first = first if first is not None else now
                    tokens = ev.tokens
                    reply.prompt_tokens = loop.prompt_tokens
                    pending += text
                    if now - posted >= reply.delta_interval:
                        self.post_message(ReplyDelta(reply.id, pending, tokens, now - first))
                        pending, posted = "", now
                    continue
                if ev.kind != "done" and pending:
                    self.post_message(ReplyDelta(reply.id, pending, tokens, 0.0))
                    pending = ""
                if ev.kind == "call":
                    self.post_message(ToolCallStarted(reply.id, ev.call_id, ev.label))
                elif ev.kind == "result":
                    self.post_message(ToolCallFinished(reply.id, ev.call_id, ev.result))
                elif ev.kind == "notice":
                    self.call_from_thread(self.notify, ev.text, severity="warning")
                elif ev.kind == "done":
                    tail = citations.flush() if citations is not None else ""
                    if pending or tail:
                        self.post_message(ReplyDelta(reply.id, pending + tail, tokens, 0.0))
                    self.post_message(ReplyDone(reply.id, ev.stats))
                    return
        except Exception as e:  # user-causable (context overflow, model load) or a bug: shown, not raised
            self.post_message(ReplyDone(reply.id, None, error=str(e) or type(e).__name__))

    def with_tool_views(self, views: list[Any], messages: list[Any]) -> list[Any]:
        """The chat's message views with each stored reply's tool calls (collapsed) before it."""
        out: list[Any] = []
        for view, m in zip(views, messages, strict=True):
            for c in (m.stats or {}).get("tool_calls") or [] if m.role == "assistant" else []:
                call = ToolCallView(c["id"], call_label(c["name"], c["arguments"]))
                call.show_result(ToolResult(c["name"], c["arguments"], c["content"], c["ok"], c["refused"]))
                out.append(call)
            out.append(view)
        return out

    def _confirm_call(self, reply: Any, tool: Tool, args: dict[str, Any]) -> bool:
        """Ask the user (on the UI thread) whether this exact call may run; blocks the worker until the
        answer. Esc on the reply (stopping it) answers no."""
        answer: list[bool] = []
        done = threading.Event()

        def ask() -> None:
            def answered(ok: bool | None) -> None:
                answer.append(bool(ok))
                done.set()

            text = args.get("command") if isinstance(args.get("command"), str) else str(args)
            self.push_screen(ConfirmCommand(tool.name, text), answered)

        self.call_from_thread(ask)
        loop = reply.generation
        while not done.wait(0.1):
            if loop is not None and loop.cancel_requested.is_set():
                self.call_from_thread(self._dismiss_confirm)
                return False
        return answer[0]

    def _dismiss_confirm(self) -> None:
        if isinstance(self.screen, ConfirmCommand):
            self.screen.dismiss(False)

    async def on_tool_call_started(self, event: ToolCallStarted) -> None:
        reply = self.reply
        if reply is None or reply.id != event.generation_id or reply.view is None:
            return
        view = ToolCallView(event.call_id, event.label)
        conv = self.query_one("#conversation", VerticalScroll)
        await conv.mount(view, before=reply.view)
        conv.scroll_end(animate=False)

    def on_tool_call_finished(self, event: ToolCallFinished) -> None:
        r = event.result
        if self.reply is not None and self.reply.id == event.generation_id:
            self.reply.recorder.tool_calls.append(
                {"id": event.call_id, "name": r.name, "arguments": r.arguments, "content": r.content,
                 "ok": r.ok, "refused": r.refused}
            )  # fmt: skip
        for view in self.query(ToolCallView):
            if view.call_id == event.call_id and view.result is None:
                view.show_result(event.result)
