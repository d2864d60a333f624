"""`[keys]` in config.toml: chat app key bindings by action name."""

from __future__ import annotations

import pytest

from ripelm.config import ConfigError, load_config


def test_keys_table(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('model = "smollm2:135m"\n[keys]\nregenerate = "ctrl+g"\ncancel = "escape,ctrl+c"\n')
    cfg = load_config(path)
    assert cfg.keys == {"regenerate": "ctrl+g", "cancel": "escape,ctrl+c"}
    assert load_config(tmp_path / "missing.toml").keys == {}


def test_keys_must_be_strings(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[keys]\nregenerate = 5\n")
    with pytest.raises(ConfigError, match="keys"):
        load_config(path)
