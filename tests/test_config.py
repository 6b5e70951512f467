"""Settings precedence: defaults < TOML file < environment < flags, and clear errors."""

from __future__ import annotations

import pytest

from edgeweave.config import ConfigError, load_settings


def test_defaults_without_file(tmp_path):
    settings = load_settings(tmp_path / "missing.toml", environ={})
    assert settings.node.port == 50551
    assert settings.cluster.insecure is False
    assert settings.coordinator.peers == []


def test_file_then_environment_then_flag(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[node]\nport = 6000\nname = "pi"\n[coordinator]\npeers = ["10.1.1.1:1"]\n[cluster]\ninsecure = true\n'
    )
    settings = load_settings(path, environ={})
    assert (settings.node.port, settings.node.name) == (6000, "pi")
    assert settings.coordinator.peers == ["10.1.1.1:1"]
    assert settings.cluster.insecure is True

    settings = load_settings(path, environ={"EDGEWEAVE_NODE_PORT": "7000", "EDGEWEAVE_COORDINATOR_PEERS": "a:1, b:2"})
    assert settings.node.port == 7000
    assert settings.coordinator.peers == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node]\nprot = 1\n", "unknown key [node] prot"),
        ("[nodes]\nport = 1\n", "unknown section [nodes]"),
        ("[node]\nport = 'abc'\n", "[node] port must be a int"),
        ("[cluster]\ninsecure = 'maybe'\n", "[cluster] insecure must be true or false"),
        ("[node\n", "is not valid TOML"),
    ],
)
def test_bad_config_is_named(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(path, environ={})


def test_bad_environment_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match="port must be a int"):
        load_settings(tmp_path / "none.toml", environ={"EDGEWEAVE_NODE_PORT": "fast"})
