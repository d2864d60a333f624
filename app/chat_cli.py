"""`ripe chat`: the Textual chat app on a terminal, the line-based chat (`--plain`) anywhere else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ripelm.tui.backends import BackendPool

ArgAdder = Callable[[argparse.ArgumentParser], None]


def add_parser(sub: argparse._SubParsersAction, *, model_args: ArgAdder, sampling_args: ArgAdder) -> None:
    from ripelm.draft_cli import add_draft_args

    chat = sub.add_parser(
        "chat",
        help="talk to a model in the terminal",
        description="A keyboard-first chat app: chats saved in a sidebar, replies streamed as Markdown. "
        "Enter sends (Ctrl+J: a new line), Esc stops a reply, Ctrl+R regenerates, F3 edits your last "
        "message (both keep the old version as a branch), Ctrl+Up selects a message (c copies it, 1-9 a code "
        "block, < > switch versions), Ctrl+F searches all messages, Ctrl+N starts a chat, Ctrl+P lists "
        "every command, Ctrl+Q quits. Memory: what you state about yourself (\"call me Sam\") is remembered "
        "and recalled in later chats; /remember TEXT, /forget N, /memories (see, edit, delete), /memory off "
        "(this chat), [memory] in config.toml. Keys can be changed under [keys] in config.toml. "
        "Without a terminal "
        "(or with --plain) it is a line-based chat: /exit or Ctrl-D "
        "leaves.",
    )
    chat.add_argument("--system", default=None, help="system prompt for new chats")
    chat.add_argument(
        "--plain",
        action="store_true",
        help="line-based chat on stdin/stdout (the default without a terminal)",
    )
    model_args(chat)
    add_draft_args(chat)
    sampling_args(chat)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
        from ripelm.commands import cmd_chat as plain_chat

        return plain_chat(args)
    return run_app(args)


def run_app(args: argparse.Namespace) -> int:
    from ripelm.chat_store import ChatStore
    from ripelm.chat_turns import sampling_from_args
    from ripelm.config import config_path, load_config
    from ripelm.tui.app import RipeApp

    cfg = load_config()
    defaults = sampling_from_args(args)
    pool, choices, default_model = open_pool(args, cfg)
    store: ChatStore | None = None
    from ripelm.assistant_tools.settings import ChatTools
    from ripelm.models.store import data_dir

    chat_tools = ChatTools.from_settings(cfg.tools, log_path=data_dir() / "mcp-servers.log")
    try:
        store = ChatStore()
        app = RipeApp(
            store,
            pool,
            defaults,
            system=args.system,
            model_choices=choices,
            keymap=cfg.keys,
            enter_sends=cfg.enter_sends,
            theme=cfg.theme,
            config_path=cfg.path or config_path(),
            default_model=default_model,
            memory=cfg.memory,
            chat_tools=chat_tools,
            dense_search=cfg.dense_search,
        )
        app.run()
    finally:
        chat_tools.close()
        pool.close()
        if store is not None:
            store.close()
    return 0


def open_pool(args: argparse.Namespace, cfg: Any) -> tuple[BackendPool, list[tuple[str, str]], str]:
    """The app's backends as the flags and config.toml ask, the model picker's choices and the default
    model's name. The default backend opens now, before the screen takes over, so a bad flag or a server
    that cannot be reached is one error line. With `--engine openai` the models are the server's."""
    from ripelm.models.store import BUNDLED_NAME, list_models, resolve_model
    from ripelm.tui.backends import BackendPool, ServerModels

    if (args.engine or cfg.engine) == "openai":
        from ripelm.commands import open_from_args

        servers = ServerModels(
            lambda model: open_from_args(argparse.Namespace(**{**vars(args), "model": model or args.model}))
        )
        pool = BackendPool(servers)
        backend = pool.get(None, None)
        return pool, servers.choices(backend.base_url), backend.model

    def opener(model: str | None, draft: str | None):
        from ripelm.commands import open_from_args  # the engines (torch): in the app's loading thread

        chosen = {"model": model or args.model, "draft": draft or args.draft}
        return open_from_args(argparse.Namespace(**{**vars(args), **chosen}))

    resolve_model(args.model or cfg.model)  # a model that is not there: one error line, before the app
    pool = BackendPool(opener)  # the model loads in the background once the app shows (RipeApp.on_mount)
    choices = [(m.name, f"{m.name}  ({m.source}, {m.size / 1e6:.0f} MB)") for m in list_models(cfg.model)]
    return pool, choices, args.model or cfg.model or BUNDLED_NAME
