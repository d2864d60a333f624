"""The user's settings file, ``config.toml`` in ``$RIPELM_HOME`` or the platform's user config dir.

Everything in it is optional; a command-line flag always wins over the file::

    model = "qwen2.5:0.5b"        # default --model for run and chat
    engine = "openai"             # default --engine: auto, native, llama.cpp or openai

    [openai]                      # the OpenAI-compatible server used by --engine openai
    base_url = "http://127.0.0.1:8080/v1"
    api_key = "sk-..."            # or leave it out and set RIPELM_OPENAI_API_KEY / OPENAI_API_KEY
    model = "my-model"            # the server's model id (default: the first one it lists)
    sampling_extras = true        # send top_k / min_p / repeat penalty (false for servers that reject them)

    [chat]                        # `ripe chat`
    enter_sends = true            # false: Enter starts a new line, Ctrl+J (or Shift+Enter) sends
    theme = "nord"                # the app's theme (the app saves the one picked with Ctrl+P > Theme)

    [memory]                      # `ripe chat`: facts about you, recalled in later chats
    enabled = true                # false: nothing is saved or recalled (per chat: /memory off)
    budget_tokens = 150           # at most this many prompt tokens of memories per reply
    auto = true                   # save what you state about yourself ("call me Sam"); false: /remember only
    [tools]                       # tools the chat app offers the model (see assistant_tools/settings.py)
    on = ["read_file"]            #   also off, folders, max_calls, max_file_kb, shell_timeout;
    folders = ["~/notes"]         #   and [mcp.servers.NAME] with command, args, env, cwd
    [serve]                       # `ripe serve`
    thinking = false              # reasoning models (Qwen3...) answer without thinking where the template can

    [keys]                        # `ripe chat` key bindings: action = "key" (comma-separated for several)
    regenerate = "ctrl+r"         # also: cancel, new_chat, edit_last, pick_model, rename_chat, copy_reply,
    export_chat = "ctrl+s"        #   copy_code, export_chat, toggle_sidebar, search_chats, search_messages,
                                  #   select_message, memories
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ripelm.assistant_tools.settings import ToolSettings, parse_tool_config
from ripelm.errors import ConfigError
from ripelm.models.store import config_dir

ENGINE_CHOICES = ("auto", "native", "llama.cpp", "openai")


@dataclass
class OpenAIConfig:
    base_url: str | None = None
    api_key: str | None = None
    model: str | None = None
    sampling_extras: bool = True


@dataclass
class MemoryConfig:
    enabled: bool = True
    budget_tokens: int = 150
    auto: bool = True


@dataclass
class Config:
    model: str | None = None
    engine: str | None = None
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    keys: dict[str, str] = field(default_factory=dict)  # chat app binding id -> key(s)
    enter_sends: bool = True  # [chat]: Enter sends the message (else Ctrl+J does)
    theme: str | None = None  # [chat]: the chat app's theme
    dense_search: bool = True  # [chat]: message search fuses BM25 with embeddings (where an embedder is)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    tools: ToolSettings = field(default_factory=ToolSettings)  # [tools] and [mcp.servers.*]
    thinking: bool | None = None  # [serve]: enable_thinking for templates that have it (None: theirs)
    path: Path | None = None


def config_path() -> Path:
    return config_dir() / "config.toml"


def _take(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.pop(key, None)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{where}: '{key}' must be a {kind.__name__}, not {type(value).__name__}")
    return value


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    if not path.is_file():
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    where = str(path)
    cfg = Config(path=path)
    cfg.model = _take(data, "model", str, where)
    cfg.engine = _take(data, "engine", str, where)
    if cfg.engine is not None and cfg.engine not in ENGINE_CHOICES:
        raise ConfigError(f"{where}: engine must be one of {', '.join(ENGINE_CHOICES)}, not '{cfg.engine}'")
    section = data.pop("openai", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [openai] must be a table")
    w = f"{where} [openai]"
    extras = _take(section, "sampling_extras", bool, w)
    cfg.openai = OpenAIConfig(
        base_url=_take(section, "base_url", str, w),
        api_key=_take(section, "api_key", str, w),
        model=_take(section, "model", str, w),
        sampling_extras=True if extras is None else extras,
    )
    chat = data.pop("chat", {})
    if not isinstance(chat, dict):
        raise ConfigError(f"{where}: [chat] must be a table")
    enter_sends = _take(chat, "enter_sends", bool, f"{where} [chat]")
    cfg.enter_sends = True if enter_sends is None else enter_sends
    cfg.theme = _take(chat, "theme", str, f"{where} [chat]")
    dense = _take(chat, "dense_search", bool, f"{where} [chat]")
    cfg.dense_search = True if dense is None else dense
    mem = data.pop("memory", {})
    if not isinstance(mem, dict):
        raise ConfigError(f"{where}: [memory] must be a table")
    w = f"{where} [memory]"
    enabled, budget, auto = (_take(mem, k, t, w) for k, t in (("enabled", bool), ("budget_tokens", int),
                                                                ("auto", bool)))  # fmt: skip
    if budget is not None and not 0 <= budget <= 4096:
        raise ConfigError(f"{w}: budget_tokens must be between 0 and 4096, not {budget}")
    cfg.memory = MemoryConfig(
        enabled=True if enabled is None else enabled,
        budget_tokens=150 if budget is None else budget,
        auto=True if auto is None else auto,
    )
    cfg.tools = parse_tool_config(data.pop("tools", None), data.pop("mcp", None), where, ConfigError)
    serve = data.pop("serve", {})
    if not isinstance(serve, dict):
        raise ConfigError(f"{where}: [serve] must be a table")
    cfg.thinking = _take(serve, "thinking", bool, f"{where} [serve]")
    keys = data.pop("keys", {})
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise ConfigError(f'{where}: [keys] must map actions to key names, e.g. regenerate = "ctrl+r"')
    cfg.keys = dict(keys)
    unknown = [*data, *(f"openai.{k}" for k in section), *(f"chat.{k}" for k in chat),
               *(f"memory.{k}" for k in mem), *(f"serve.{k}" for k in serve)]  # fmt: skip
    if unknown:
        raise ConfigError(f"{where}: unknown settings: {', '.join(unknown)}")
    return cfg


def save_chat_setting(key: str, value: Any, path: Path | None = None) -> None:
    """Set `key` under `[chat]` in config.toml (the app's theme), keeping the rest of the file as the user
    wrote it, comments included (tomlkit). Written to a temporary file and renamed over the old one, so a
    crash leaves either file whole."""
    import os

    import tomlkit

    path = path or config_path()
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
        table = doc.get("chat")
        if table is None:
            table = tomlkit.table()
            doc["chat"] = table
        table[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, tomlkit.exceptions.TOMLKitError) as e:
        raise ConfigError(f"cannot save {key} to {path}: {e}") from e
