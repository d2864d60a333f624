"""The `ripe chat` app: chats in a sidebar, the conversation streaming as Markdown, a prompt, a status bar.

Engine work never runs on the UI's event loop: a reply is generated in a thread worker that posts
`ReplyDelta`/`ReplyDone` messages, and the UI thread renders them and checkpoints the reply into the
chat store (all database access happens on the UI thread). Esc cancels the engine request directly.
With a server engine (`--engine openai`) the chat messages go to the server as they are (it renders the
template and owns the context window); Esc ends the reply at once (see `RemoteGeneration`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll

from ripelm.assistant_tools.settings import ChatTools
from ripelm.chat_docs import fit_sources, retrieve, source_records, with_sources
from ripelm.chat_store import Chat, ChatStore
from ripelm.chat_store.records import CANCELLED
from ripelm.chat_turns import ReplyRecorder, build_prompt, count_tokens, history, sampling_for
from ripelm.config import MemoryConfig
from ripelm.doc_qa import CitationFilter
from ripelm.generation import Generation, RemoteGeneration
from ripelm.memory_recall import Gathered
from ripelm.runtime.sampling import SamplingParams
from ripelm.tui.active_reply import ActiveReply
from ripelm.tui.backends import BackendPool
from ripelm.tui.branching import Branching
from ripelm.tui.chat_actions import DEFAULT_TITLE, ChatActions
from ripelm.tui.chat_list import ChatList
from ripelm.tui.memory_actions import MemoryActions
from ripelm.tui.message_index import MessageIndex
from ripelm.tui.message_view import MessageView
from ripelm.tui.messages import CancelAcknowledged, ReplyDelta, ReplyDone, ReplySources, next_delta_interval
from ripelm.tui.prompt_area import PromptArea, prompt_placeholder
from ripelm.tui.status_bar import StatusBar, backend_numbers, done_numbers, is_remote, live_numbers
from ripelm.tui.tool_turns import ToolTurns


class RipeApp(Branching, ChatActions, MemoryActions, MessageIndex, ToolTurns, App[None]):
    CSS_PATH = "ripe.tcss"
    TITLE = "ripe chat"
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "cancel", "Stop reply", id="cancel"),
        Binding("ctrl+n", "new_chat", "New chat", id="new_chat"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("f3", "edit_last", "Edit last", id="edit_last"),
        Binding("ctrl+o", "pick_model", "Model", id="pick_model"),
        Binding("f2", "rename_chat", "Rename", id="rename_chat"),
        Binding("ctrl+y", "copy_reply", "Copy reply", id="copy_reply", priority=True),  # over redo
        Binding("f4", "copy_code", "Copy code", id="copy_code"),
        Binding("ctrl+up", "select_message", "Select message", id="select_message"),
        Binding("ctrl+s", "export_chat", "Export", id="export_chat"),
        Binding("ctrl+b", "toggle_sidebar", "Sidebar", id="toggle_sidebar"),
        Binding("f6", "search_chats", "Search", id="search_chats", priority=True),  # over select line
        Binding("ctrl+f", "search_messages", "Search messages", id="search_messages"),
        Binding("f7", "memories", "Memories", id="memories", priority=True),  # over select all
    ]

    def __init__(
        self,
        store: ChatStore,
        pool: BackendPool,
        defaults: SamplingParams,
        *,
        system: str | None = None,
        model_choices: list[tuple[str, str]] | None = None,
        keymap: dict[str, str] | None = None,
        export_dir: Path | None = None,
        default_model: str = "default",
        enter_sends: bool = True,
        theme: str | None = None,
        config_path: Path | None = None,
        memory: MemoryConfig | None = None,
        chat_tools: ChatTools | None = None,
        dense_search: bool = True,
    ):
        super().__init__()
        self.setup_memory(memory)  # [memory] in config.toml
        self.setup_message_index(dense_search)  # [chat] dense_search: hybrid search over all messages
        self.store, self.pool, self.defaults = store, pool, defaults
        self.system = system
        self.model_choices = model_choices or []
        self.export_dir = export_dir or Path.cwd()
        self.default_model = default_model  # what the status bar calls the model of a chat that names none
        self._keymap_config = keymap or {}
        self.enter_sends = enter_sends  # False: Enter starts a new line and Ctrl+J sends ([chat] in config)
        self.config_path, self._saved_theme = config_path, theme  # a theme picked is saved there ([chat])
        if theme in self.available_themes:
            self.theme = theme
        self.chat: Chat | None = None
        self.reply: ActiveReply | None = None
        self.replies_started = 0  # also the id of the active reply: the worker's messages carry it
        self.index_reports: list = []
        self.chat_tools, self.tool_loops = chat_tools, []  # tools offered to the model (None: no tools)

    # ---- layout -----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield ChatList()
            with Vertical(id="main"):
                yield VerticalScroll(id="conversation")
                placeholder = prompt_placeholder(self.enter_sends)
                yield PromptArea(enter_sends=self.enter_sends, placeholder=placeholder, id="prompt")
        yield StatusBar()

    async def on_mount(self) -> None:
        if self._keymap_config:
            self.set_keymap(self._keymap_config)
        chats = self.store.chats()
        chat = chats[0] if chats else self.store.new_chat(DEFAULT_TITLE, system=self.system)
        await self.open_chat(chat.id)
        self._show_backend()
        self.query_one("#prompt", PromptArea).focus()
        if self.pool.current() is None:  # the model loads while the app already takes input, from after
            self.call_after_refresh(self.load_model, chat.model, chat.draft)  # the first paint (GIL: torch)

    def _show_backend(self) -> None:
        b = self.pool.current()
        bar = self.query_one(StatusBar)
        if b is None:
            bar.show(model=self.pool.model or self.default_model, engine="loading…", device="")
            return
        kv = self._kv()
        numbers = backend_numbers(b, self.pool.model or self.default_model)
        bar.show(**numbers, kv_used=kv[0] if kv else None, kv_total=kv[1] if kv else None)

    def _kv(self) -> tuple[int, int] | None:
        backend = self.pool.current()
        if backend is None or not backend.caps.kv_stats:
            return None
        return backend.kv_blocks()

    # ---- chats ------------------------------------------------------------------------------------
    def refresh_chat_list(self) -> None:
        chat_list = self.query_one(ChatList)
        self.run_worker(
            chat_list.show(self.store.chats(chat_list.search), self.chat.id if self.chat else None)
        )

    async def open_chat(self, chat_id: int) -> None:
        if self.reply is not None and self.reply.view is not None:
            leaving, self.reply.view = self.reply.view, None  # deltas from now on only go to the store
            await leaving.end_stream()
        if self.chat is None or self.chat.id != chat_id:
            self.editing = None  # an edit belongs to its chat
        self.chat = self.store.chat(chat_id)
        conv = self.query_one("#conversation", VerticalScroll)
        await conv.remove_children()
        versions = self.store.versions(chat_id)
        stored = self.store.messages(chat_id)
        views = [
            MessageView(m.role, m.content, state=m.state, message_id=m.id, sources=m.sources) for m in stored
        ]
        streaming = self.reply is not None and self.reply.chat_id == chat_id and bool(views)
        if streaming:  # the reply still streaming here: show what it has so far, then keep streaming into it
            views[-1] = MessageView(
                "assistant", self.reply.recorder.content, state="streaming", message_id=views[-1].message_id
            )
        for view in views:
            view.versions = versions.get(view.message_id, [])
        await conv.mount_all(self.with_tool_views(views, stored))
        if streaming and self.reply is not None and self.reply.chat_id == chat_id:
            view = views[-1]
            missing = self.reply.recorder.content[len(view.content) :]  # what came while mounting
            self.reply.view = view  # before the await: text arriving meanwhile goes to the view too
            await view.append(missing)
        conv.scroll_end(animate=False)
        self.sub_title = self.chat.title
        await self.query_one(ChatList).show(self.store.chats(self.query_one(ChatList).search), chat_id)

    async def on_chat_list_selected(self, event: ChatList.Selected) -> None:
        await self.open_chat(event.chat_id)
        self.query_one("#prompt", PromptArea).focus()

    async def action_new_chat(self) -> None:
        chat = self.store.new_chat(
            DEFAULT_TITLE, system=self.system, model=self.chat.model if self.chat else None
        )
        await self.open_chat(chat.id)
        self.query_one("#prompt", PromptArea).focus()

    # ---- sending and streaming ----------------------------------------------------------------------
    async def on_prompt_area_submitted(self, event: PromptArea.Submitted) -> None:
        text = event.value.strip()
        if not text or self.chat is None:
            return
        if self.reply is not None:
            self.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        event.area.value = ""
        if await self.memory_command(text) or await self.tools_command(text):  # /remember…, /tools…
            return
        if self.editing is not None:
            await self.send_edit(text)
            return
        if self.chat.title == DEFAULT_TITLE:
            self.store.rename_chat(self.chat.id, text[:40])
            self.chat = self.store.chat(self.chat.id)
            self.refresh_chat_list()
        msg = self.store.add_message(self.chat.id, "user", text)
        await self.query_one("#conversation").mount(MessageView("user", text, message_id=msg.id))
        self.notice_memories(text, msg.id)
        await self.start_reply()

    async def start_reply(self, replace_from: int | None = None) -> None:
        """Generate the next assistant message of the current chat from its stored history (all of it, or
        what comes before message `replace_from`: the new reply is its new version, the old one kept)."""
        assert self.chat is not None
        chat = self.chat
        params = sampling_for(chat, self.defaults)
        msgs = self.store.messages(chat.id)
        if replace_from is not None:
            msgs = [m for m in msgs if m.id < replace_from]
        turns = history(chat, msgs, with_tools=self.chat_tools is not None)
        self.replies_started += 1
        recorder = ReplyRecorder.start(self.store, chat.id, replace_from=replace_from)
        self.reply = ActiveReply(self.replies_started, chat.id, None, recorder, None)
        if replace_from is None:
            self.reply.view = view = MessageView("assistant", "", state="streaming")
            conv = self.query_one("#conversation", VerticalScroll)
            await conv.mount(view)
            conv.scroll_end(animate=False)
        else:  # a new version: the branch is shown again, ending in it (open_chat streams into it)
            await self.open_chat(chat.id)
        found = self.memory_gather(turns[-1]["content"]) if turns else None
        if self.chat_tools is not None:
            self.generate_with_tools(self.reply, chat, turns, params, found)
        else:
            self._generate(self.reply, chat.model, chat.draft, chat.collection, turns, params, found)

    @work(thread=True, exclusive=False, group="generation")
    def _generate(
        self,
        reply: ActiveReply,
        model: str | None,
        draft: str | None,
        collection: str | None,
        turns: list[dict[str, str]],
        params: SamplingParams,
        memories: Gathered | None = None,
    ) -> None:
        citations: CitationFilter | None = None
        try:
            if self.pool.current() is None or (model, draft) != self.pool.key:
                self.call_from_thread(self.query_one(StatusBar).show, engine="loading…")
            backend = self.pool.get(model, draft)
            if collection:
                sources = retrieve(collection, turns[-1]["content"])
                if sources and not is_remote(backend):  # a server fits its own window
                    found = len(sources)
                    sources = fit_sources(
                        turns[-1]["content"], sources, lambda m: count_tokens(backend, m),
                        backend.context_length, params.max_tokens,
                    )  # fmt: skip
                    if len(sources) < found:
                        self.call_from_thread(self.passages_trimmed, found - len(sources), found)
                if sources:
                    turns = with_sources(turns, sources)
                    citations = CitationFilter({s.number for s in sources})
                    self.post_message(ReplySources(reply.id, source_records(sources)))
            turns = self.recall_into(turns, memories, backend, reply)
            gen: Generation | RemoteGeneration
            if is_remote(backend):
                reply.remote = True
                gen = RemoteGeneration(
                    backend, turns, params, on_trim=lambda n: self.call_from_thread(self._trimmed, n)
                )
            else:
                prompt = build_prompt(backend, turns, params)
                if prompt.fitted.dropped:
                    self.call_from_thread(self._trimmed, prompt.fitted.dropped)
                reply.prompt_tokens = len(prompt.ids)
                gen = Generation(backend, prompt.ids, params)
            reply.generation = gen
            if reply.cancel_pressed is not None:
                gen.cancel()
            first: float | None = None
            tokens = 0
            # Text goes to the UI every reply.delta_interval seconds (next_delta_interval): at 150+
            # tokens/s, one UI message per token kept the UI thread busy enough to take a core from the
            # engine's step.
            pending, posted = "", 0.0
            for ev in gen.events():
                text = ev.text
                if citations is not None:  # only citations that name a retrieved source get through
                    text = citations.feed(text) + (citations.flush() if ev.done else "")
                if ev.done:
                    if pending or text:
                        self.post_message(ReplyDelta(reply.id, pending + text, tokens, 0.0))
                    self.post_message(ReplyDone(reply.id, ev.stats))
                    return
                now = time.perf_counter()
                first = first if first is not None else now
                tokens += 1
                pending += text
                if now - posted >= reply.delta_interval:
                    self.post_message(ReplyDelta(reply.id, pending, tokens, now - first))
                    pending, posted = "", now
        except Exception as e:  # user-causable (context overflow, model load) or a bug: shown, not raised
            self.post_message(ReplyDone(reply.id, None, error=str(e) or type(e).__name__))

    async def on_reply_delta(self, event: ReplyDelta) -> None:
        reply = self.reply
        if reply is None or reply.id != event.generation_id:
            return
        reply.recorder.feed(event.text)
        cpu = time.thread_time()
        if reply.ui_cpu is not None:
            reply.delta_interval = next_delta_interval(cpu - reply.ui_cpu)
        reply.ui_cpu = cpu
        if reply.view is not None:
            await reply.view.append(event.text)
            self.query_one("#conversation", VerticalScroll).scroll_end(animate=False)
        now = time.monotonic()
        if event.tokens > 1 and event.elapsed_s > 0 and now - reply.shown_at > 0.2:
            reply.shown_at = now
            kv = self._kv()
            chars = len(reply.recorder.content)
            self.query_one(StatusBar).show(
                **live_numbers(reply.remote, event.tokens, chars, event.elapsed_s, reply.prompt_tokens),
                kv_used=kv[0] if kv else None,
                kv_total=kv[1] if kv else None,
            )

    def on_reply_sources(self, event: ReplySources) -> None:
        reply = self.reply
        if reply is None or reply.id != event.generation_id:
            return
        self.store.set_sources(reply.recorder.message.id, event.sources)
        if reply.view is not None:
            reply.view.sources = event.sources

    async def on_reply_done(self, event: ReplyDone) -> None:
        reply = self.reply
        if reply is None or reply.id != event.generation_id:
            return
        self.reply = None
        state = reply.recorder.finish(event.stats, error=event.error is not None)
        if reply.view is not None:
            await reply.view.end_stream()
            reply.view.message_id = reply.recorder.message.id
            reply.view.set_state(state)
            await reply.view.show_sources()
        if event.error:
            self.notify(event.error, title="generation failed", severity="error")
        s = event.stats
        if s is not None:
            kv = self._kv()
            self.query_one(StatusBar).show(
                **done_numbers(s, reply.remote, len(reply.recorder.content)),
                kv_used=kv[0] if kv else None,
                kv_total=kv[1] if kv else None,
            )
        self._show_backend()

    def action_cancel(self) -> None:
        if self.reply is None and self.stop_editing():
            return
        reply = self.reply
        if reply is None or reply.cancel_pressed is not None:
            return
        pressed = time.perf_counter()
        reply.cancel_pressed = pressed
        if reply.generation is None:
            return  # still loading the model: the worker cancels as soon as the generation exists
        ack = reply.generation.cancel()

        def wait_ack() -> None:
            if ack.wait(10.0):
                now = time.perf_counter()
                self.post_message(CancelAcknowledged(now - pressed, now))

        threading.Thread(target=wait_ack, name="ripelm-cancel-ack", daemon=True).start()

    def on_cancel_acknowledged(self, event: CancelAcknowledged) -> None:
        self.query_one(StatusBar).show(notice=f"stopped in {event.latency_s * 1000:.0f} ms")

    def on_unmount(self) -> None:
        """Quitting mid-reply stops the engine and keeps the text so far, as a stopped reply."""
        reply, self.reply = self.reply, None
        if reply is not None:
            if reply.generation is not None:
                reply.generation.cancel()
            reply.recorder.store.save_reply(
                reply.recorder.message.id, reply.recorder.content, state=CANCELLED
            )
