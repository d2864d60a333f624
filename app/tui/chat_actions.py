"""The chat app's actions around the conversation: rename, delete, search, model and collection pickers,
copy (OSC 52), export to Markdown, and the command palette entries for every action.

A mixin of `RipeApp` (app.py), kept apart so the streaming core stays small; it uses the app's `store`,
`chat`, `reply`, `model_choices` and `export_dir`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import SystemCommand
from textual.screen import Screen
from textual.widgets import Input

from ripelm.chat_docs import collection_names, index_folder
from ripelm.chat_export import chat_markdown, code_blocks, export_filename
from ripelm.chat_store.records import SearchHit
from ripelm.chat_turns import format_sampling, parse_sampling
from ripelm.config import save_chat_setting
from ripelm.models.errors import RipelmError
from ripelm.tui.chat_list import ChatList
from ripelm.tui.dialogs import Picker, TextPrompt
from ripelm.tui.message_view import MessageView
from ripelm.tui.messages import BackendReady
from ripelm.tui.search_screen import MessageSearch
from ripelm.tui.status_bar import StatusBar, is_remote
from ripelm.tui.watch_actions import WatchActions

DEFAULT_TITLE = "New chat"


class ChatActions(WatchActions):
    store: Any
    pool: Any  # the app's BackendPool
    chat: Any
    reply: Any
    system: str | None
    model_choices: list[tuple[str, str]]
    export_dir: Path
    defaults: Any  # the command line's SamplingParams
    index_reports: list[Any]  # what each indexing run from the app did
    config_path: Path | None
    passage_notices: int = 0  # times retrieved passages were trimmed to fit the context
    _saved_theme: str | None

    def watch_theme(self, theme: str) -> None:
        """A theme picked in the palette is saved to config.toml for the next start."""
        if self.config_path is None or theme == self._saved_theme:
            return
        self._saved_theme = theme
        try:
            save_chat_setting("theme", theme, self.config_path)
        except RipelmError as e:
            self.notify(str(e), severity="warning")

    @work(thread=True, group="load")
    def load_model(self, model: str | None, draft: str | None) -> None:
        """Open the chat's model in the background: the app takes input meanwhile, and a message sent
        before the model is ready waits for it (BackendPool.get holds a lock)."""
        try:
            self.pool.get(model, draft)
        except Exception as e:  # a model that cannot load: shown in the app, which goes on
            self.post_message(BackendReady(model, error=str(e) or type(e).__name__))
            return
        self.post_message(BackendReady(model))

    def on_backend_ready(self, event: BackendReady) -> None:
        if event.error:
            self.notify(event.error, title="the model did not load", severity="error")
            self.query_one(StatusBar).show(engine="not loaded", notice=event.error[:80])
        else:
            self._show_backend()

    def _trimmed(self, dropped: int) -> None:
        self.query_one(StatusBar).show(notice=f"{dropped} earliest messages left out to fit the context")
        self.notify(f"the chat no longer fits the context window: {dropped} earliest messages left out")

    def passages_trimmed(self, left_out: int, found: int) -> None:
        self.passage_notices += 1
        note = f"{left_out} of {found} retrieved passages left out to fit the context"
        self.query_one(StatusBar).show(notice=note)
        self.notify(f"{note}: the answer uses the {found - left_out} most relevant")

    def action_rename_chat(self) -> None:
        if self.chat is None:
            return
        chat_id = self.chat.id

        async def done(title: str | None) -> None:
            if title and title.strip():
                self.store.rename_chat(chat_id, title)
                await self.open_chat(chat_id)

        self.push_screen(TextPrompt("Rename chat", self.chat.title), done)

    async def action_delete_chat(self) -> None:
        if self.chat is None or (self.reply is not None and self.reply.chat_id == self.chat.id):
            self.notify("stop the reply first (Esc)", severity="warning")
            return
        self.store.delete_chat(self.chat.id)
        chats = self.store.chats()
        await self.open_chat(
            chats[0].id if chats else self.store.new_chat(DEFAULT_TITLE, system=self.system).id
        )

    def action_toggle_sidebar(self) -> None:
        self.query_one(ChatList).toggle_class("hidden")

    def action_search_chats(self) -> None:
        chat_list = self.query_one(ChatList)
        chat_list.remove_class("hidden")
        chat_list.query_one("#chat-search", Input).focus()

    def action_search_messages(self) -> None:
        """Search every message of every chat; Enter opens the chat at the message found."""
        self.push_screen(MessageSearch(self.store, self.search_embedders()), self._open_hit)
        self.index_messages()  # messages not embedded yet are, in the background

    async def _open_hit(self, hit: SearchHit | None) -> None:
        if hit is None:
            return
        await self.open_chat(hit.chat_id)
        await self.show_message(hit.message_id)

    async def show_message(self, message_id: int) -> None:
        """Select the message with this id in the open chat (scrolled into view: after the refresh, so that
        the scroll to the end of a chat just opened does not undo it)."""
        for view in self.query(MessageView):
            if view.message_id == message_id:
                view.focus(scroll_visible=False)
                conv = self.query_one("#conversation")
                self.call_after_refresh(conv.scroll_to_center, view, animate=False)
                return

    def action_pick_model(self) -> None:
        if self.chat is None or not self.model_choices:
            return
        chat_id = self.chat.id

        async def done(model: str | None) -> None:
            if model:
                self.store.update_chat(chat_id, model=model)
                self.chat = self.store.chat(chat_id)
                self.notify(f"this chat now uses {model}")

        self.push_screen(Picker("Model for this chat", self.model_choices), done)

    def action_pick_draft(self) -> None:
        """Speculative decoding for this chat: a draft model sharing the chat model's vocabulary."""
        if self.chat is None:
            return
        if is_remote(self.pool.current()):
            self.notify("draft models are for the local engines: the server decodes", severity="warning")
            return
        chat_id = self.chat.id

        def done(draft: str | None) -> None:
            if draft is not None:
                self.store.update_chat(chat_id, draft=draft or None)
                self.chat = self.store.chat(chat_id)
                self.notify(f"draft model: {draft or 'the command line default'}")

        choices = [
            ("", "(the command line's --draft, if any)"),
            ("auto", "auto: the catalog pairing or a Q4_1 copy"),
        ]
        self.push_screen(Picker("Draft model for this chat", choices + self.model_choices), done)

    def action_attach_collection(self) -> None:
        """Answer this chat's questions from a collection (`ripe index PATH -c NAME`), with citations."""
        if self.chat is None:
            return
        names = collection_names()
        if not names:
            self.notify("no collections yet: index files with `ripe index PATH -c NAME`", severity="warning")
            return
        chat_id = self.chat.id

        async def done(name: str | None) -> None:
            if name is not None:
                self.store.update_chat(chat_id, collection=name or None)
                self.chat = self.store.chat(chat_id)
                self.query_one(StatusBar).show(notice=f"documents: {name}" if name else "no documents")

        choices = [("", "(no collection)")] + [(n, n) for n in names]
        self.push_screen(Picker("Answer from documents in", choices), done)

    def action_index_folder(self) -> None:
        """Index a folder into a collection (progress in the status bar) and attach it to this chat."""
        if self.chat is None:
            return
        chat_id = self.chat.id

        def got_folder(folder: str | None) -> None:
            if folder and folder.strip():
                path = Path(folder.strip()).expanduser()
                self.push_screen(
                    TextPrompt("Collection name", path.resolve().name or "docs"),
                    lambda name: self._index(chat_id, path, name.strip()) if name and name.strip() else None,
                )

        self.push_screen(TextPrompt("Folder to index", str(Path.cwd())), got_folder)

    @work(thread=True, group="index")
    def _index(self, chat_id: int, folder: Path, name: str) -> None:
        bar = self.query_one(StatusBar)

        def progress(p: Any) -> None:
            self.call_from_thread(bar.show, notice=f"indexing {p.done}/{p.total} files, {p.chunks} chunks")

        try:
            report = index_folder(folder, name, progress)
        except Exception as e:  # a bad folder or embedder: shown, the app goes on
            self.call_from_thread(self.notify, str(e), title="indexing failed", severity="error")
            return
        self.call_from_thread(self._indexed, chat_id, name, report)

    def _indexed(self, chat_id: int, name: str, report: Any) -> None:
        self.index_reports.append(report)
        self.store.update_chat(chat_id, collection=name)
        if self.chat is not None and self.chat.id == chat_id:
            self.chat = self.store.chat(chat_id)
        done = f"{name}: {report.indexed} files indexed, {report.chunks_total} chunks"
        self.query_one(StatusBar).show(notice=done)
        self.notify(f"{done}; this chat now answers from it")

    def action_set_sampling(self) -> None:
        if self.chat is None:
            return
        chat_id = self.chat.id

        def done(text: str | None) -> None:
            if text is None:
                return
            try:
                params = parse_sampling(text, self.defaults)
                params.update({k: v for k, v in self.store.chat(chat_id).params.items() if k == "tools"})
            except RipelmError as e:
                self.notify(str(e), title="sampling settings", severity="error")
                return
            self.store.update_chat(chat_id, params=params)
            self.chat = self.store.chat(chat_id)
            self.notify(f"sampling: {format_sampling(params) or 'the defaults'}")

        title = "Sampling for this chat, e.g. temperature=0.2 max_tokens=256 (empty: the defaults)"
        self.push_screen(TextPrompt(title, format_sampling(self.chat.params)), done)

    def action_set_system(self) -> None:
        if self.chat is None:
            return
        chat_id = self.chat.id

        def done(text: str | None) -> None:
            if text is not None:
                self.store.update_chat(chat_id, system=text.strip() or None)
                self.chat = self.store.chat(chat_id)

        self.push_screen(TextPrompt("System prompt for this chat", self.chat.system or ""), done)

    def _last_reply(self) -> str | None:
        if self.chat is None:
            return None
        replies = [m for m in self.store.messages(self.chat.id) if m.role == "assistant" and m.content]
        return replies[-1].content if replies else None

    def action_select_message(self) -> None:
        """Select the last message (then Up/Down, `c` copies it, 1-9 a code block)."""
        views = list(self.query(MessageView))
        if views:
            views[-1].focus()

    def action_copy_reply(self) -> None:
        text = self._last_reply()
        if text:
            self.copy_to_clipboard(text)  # OSC 52: works over SSH in terminals that allow it
            self.notify("copied the last reply")

    def action_copy_code(self) -> None:
        blocks = code_blocks(self._last_reply() or "")
        if blocks:
            self.copy_to_clipboard(blocks[-1])
            self.notify("copied the last code block")
        else:
            self.notify("the last reply has no code block", severity="warning")

    def action_export_chat(self) -> Path | None:
        if self.chat is None:
            return None
        path = self.export_dir / export_filename(self.chat)
        path.write_text(chat_markdown(self.chat, self.store.messages(self.chat.id)), encoding="utf-8")
        self.notify(f"exported to {path}")
        return path

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New chat", "Start a new chat", self.action_new_chat)
        yield SystemCommand("Rename chat", "Give this chat a new title", self.action_rename_chat)
        yield SystemCommand("Delete chat", "Delete this chat and its messages", self.action_delete_chat)
        yield SystemCommand("Search chats", "Find a chat by title", self.action_search_chats)
        yield SystemCommand(
            "Search messages", "Find words in every message of every chat", self.action_search_messages
        )
        yield SystemCommand("Regenerate", "Replace the last reply with a new one", self.action_regenerate)
        yield SystemCommand(
            "Edit and resend", "Edit your last message and send it again", self.action_edit_last
        )
        yield SystemCommand("Stop reply", "Stop the reply that is streaming", self.action_cancel)
        yield SystemCommand("Pick model", "Choose the model for this chat", self.action_pick_model)
        yield SystemCommand("Pick draft model", "Speculative decoding for this chat", self.action_pick_draft)
        yield SystemCommand(
            "Attach collection",
            "Answer from indexed documents, with citations",
            self.action_attach_collection,
        )
        yield SystemCommand(
            "Index folder", "Index a folder of documents and answer from it", self.action_index_folder
        )
        yield SystemCommand(
            "Watch documents",
            "Re-index this chat's collection when files in its folder change (again: stop)",
            self.action_toggle_watch,
        )
        yield SystemCommand(
            "Sampling settings", "Temperature, top-p, max tokens … for this chat", self.action_set_sampling
        )
        yield SystemCommand("System prompt", "Set this chat's system prompt", self.action_set_system)
        yield SystemCommand(
            "Select message", "Then c copies it, 1-9 its code blocks, Up/Down", self.action_select_message
        )
        yield SystemCommand("Copy reply", "Copy the last reply to the clipboard", self.action_copy_reply)
        yield SystemCommand("Copy code", "Copy the last code block of the last reply", self.action_copy_code)
        yield SystemCommand("Export chat", "Save this chat as a Markdown file", self.action_export_chat)
        yield SystemCommand("Toggle sidebar", "Show or hide the list of chats", self.action_toggle_sidebar)
