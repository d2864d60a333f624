"""Tool settings: `[tools]` and `[mcp.servers.NAME]` in config.toml (bad values are one clear error), the
defaults (only the harmless tools on), a chat's own choices over the file's."""

from __future__ import annotations

import pytest

from ripelm.assistant_tools.settings import ChatTools, ToolSettings
from ripelm.config import ConfigError, load_config


def write(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_config_tables_parse(tmp_path):
    cfg = load_config(write(tmp_path, """
[tools]
on = ["read_file", "words"]
off = ["current_datetime"]
folders = ["~/notes"]
max_calls = 3
max_file_kb = 8
[mcp.servers.words]
command = "python"
args = ["server.py"]
env = { KEY = "v" }
"""))  # fmt: skip
    t = cfg.tools
    assert (t.on, t.off, t.folders, t.max_calls, t.max_file_bytes) == (
        ["read_file", "words"], ["current_datetime"], ["~/notes"], 3, 8192,
    )  # fmt: skip
    assert [(s.name, s.command, s.args, s.env) for s in t.mcp] == [
        ("words", "python", ["server.py"], {"KEY": "v"})
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[tools]\non = "read_file"', "'on' must be a list of strings"),
        ("[tools]\nmax_calls = 0", "'max_calls' must be a number >= 1"),
        ("[tools]\nshell = true", "unknown settings: tools.shell"),
        ("[mcp.servers.x]\nargs = []", "needs command"),
        ('[mcp.servers.x]\ncommand = "a"\nargs = "b"', "'args' must be a list of strings"),
        ("[mcp]\nfoo = 1", "[mcp] holds only [mcp.servers.NAME] tables"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_and_chat_choices(tmp_path):
    tools = ChatTools.from_settings(ToolSettings(folders=[str(tmp_path)]))
    box, search = tools.toolbox({}, None)
    assert box.on == {"current_datetime"} and search is None
    assert {"read_file", "list_files", "run_shell"} <= set(box.tools) - box.on  # off by default
    box, search = tools.toolbox({"tools": {"read_file": True, "current_datetime": False}}, "docs")
    assert box.on == {"read_file", "search_documents"} and search is not None
    strict = ChatTools.from_settings(ToolSettings(on=["run_shell"], off=["search_documents"]))
    box, _ = strict.toolbox({"tools": {"run_shell": False}}, "docs")
    assert box.on == {"current_datetime"}  # the chat's choice wins over the file's
