"""One settings path: every config key reaches every command that has it (file < env < flag).

Each bound option is resolved by Click itself from the default map the root callback builds,
so these tests build the very contexts a command line builds and read the parameter's value.
One subprocess test per layer checks the whole chain: the real console script, the real file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import typer

from edgeweave.cli import app
from edgeweave.cli_settings import BINDINGS, all_keys, default_map, find_command, setting
from edgeweave.config import Settings, load_settings

ROOT = typer.main.get_command(app)
BOUND = [(path, name, key) for path, options in BINDINGS.items() for name, key in options.items()]


def _distinct(default: Any) -> Any:
    """A value unlike `default`, of its type, as TOML would carry it."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 4321
    if isinstance(default, float):
        return default + 7.5
    if isinstance(default, list):
        return ["10.8.8.8:4321"] if default else ["10.9.9.9:1234"]
    return f"set-{default or 'x'}"


def _plain(value: Any) -> Any:
    """Parameter values as comparable text (Click hands back Path objects, tuples for lists)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value)


def _toml(key: str, value: Any) -> str:
    section, name = key.split(".")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = str(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(f'"{v}"' for v in value) + "]"
    else:
        text = f'"{value}"'
    return f"[{section}]\n{name} = {text}\n"


def _params(path: str, settings: Settings, args: list[str] | None = None) -> dict[str, Any]:
    """The parameters `edgeweave <path> <args>` would run with under `settings`."""
    command = find_command(ROOT, path)
    defaults = default_map(settings, ROOT)
    for part in path.split():
        defaults = defaults.get(part, {})
    required: list[str] = []
    for param in command.params:
        if getattr(param, "required", False) and param.name not in (args or []):
            required += [param.opts[0], "x"]
    ctx = command.make_context(path, [*required, *(args or [])], default_map=defaults)
    return ctx.params


def test_every_config_key_reaches_a_command():
    """A key no command reads is a key a user sets for nothing ([coordinator] cache_dir was one)."""
    bound = {key for _, _, key in BOUND}
    assert all_keys(Settings()) == bound


@pytest.mark.parametrize(("path", "name", "key"), BOUND, ids=[f"{p}--{n}" for p, n, _ in BOUND])
def test_file_then_environment_then_flag(tmp_path, path, name, key):
    param = next(p for p in find_command(ROOT, path).params if p.name == name)

    def expect(value: Any) -> Any:
        return _plain([value] if param.multiple and not isinstance(value, list) else value)

    in_file = _distinct(setting(Settings(), key))
    config = tmp_path / "config.toml"
    config.write_text(_toml(key, in_file))
    assert _plain(_params(path, load_settings(config, environ={}))[name]) == expect(in_file), \
        f"{key} in config.toml did not reach `{path}`"

    in_env = _distinct(in_file)
    section, field = key.split(".")
    env = {f"EDGEWEAVE_{section.upper()}_{field.upper()}": ",".join(in_env) if isinstance(in_env, list) else str(in_env)}
    settings = load_settings(config, environ=env)
    assert _plain(_params(path, settings)[name]) == expect(in_env), \
        f"EDGEWEAVE_{section.upper()}_{field.upper()} did not override the file for `{path}`"

    if getattr(param, "is_flag", False):  # --x/--no-x: the side that is not configured
        args, on_flag = [param.opts[0] if not in_env else param.secondary_opts[0]], not in_env
    else:
        on_flag = "10.1.2.3:9" if param.multiple else str(_distinct(in_env))
        args = [param.opts[0], on_flag]
    assert _plain(_params(path, settings, args)[name]) == expect(on_flag), \
        f"{param.opts[0]} did not win over the file and the environment for `{path}`"


def test_two_sided_flags_repeat_the_settings_default():
    """Typer's help shows a --x/--no-x flag's own default, so it must be the dataclass's."""
    for path, name, key in BOUND:
        param = next(p for p in find_command(ROOT, path).params if p.name == name)
        if getattr(param, "secondary_opts", None):
            assert param.default == setting(Settings(), key), f"{path} --{name}"


def test_unset_values_leave_the_option_empty():
    """"" and [] mean "not configured": the command sees None and applies its own fallback."""
    params = _params("run", Settings())
    assert params["peer"] in (None, [], ()) and params["cache_dir"] is None and params["quantize"] is None
    assert params["nodes"] == Settings().coordinator.nodes


def _edgeweave(*args: str, config: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEWEAVE_")}
    env.update({"EDGEWEAVE_CONFIG": config, "EDGEWEAVE_CLUSTER_INSECURE": "1", **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "edgeweave", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.slow
def test_config_file_peers_reach_run_then_environment_then_flag(tmp_path):
    """The whole chain in the real console script: `run` reads [coordinator] peers from the
    file (it used to ignore the file), the environment overrides it, a flag overrides both;
    each listed peer that does not answer is named in a one-line error, with no traceback."""
    config = tmp_path / "config.toml"
    config.write_text('[coordinator]\npeers = ["127.0.0.1:9"]\n')
    from_file = _edgeweave("run", "-p", "hi", config=str(config))
    from_env = _edgeweave("run", "-p", "hi", config=str(config), extra_env={"EDGEWEAVE_COORDINATOR_PEERS": "127.0.0.1:7"})
    from_flag = _edgeweave("run", "-p", "hi", "--peer", "127.0.0.1:5", config=str(config),
                           extra_env={"EDGEWEAVE_COORDINATOR_PEERS": "127.0.0.1:7"})
    for result, port in ((from_file, 9), (from_env, 7), (from_flag, 5)):
        assert result.returncode == 2, result.stderr
        assert f"peer 127.0.0.1:{port} " in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_broken_config_file_is_one_sentence_for_every_command(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[coordinator]\npeer = ['a:1']\n")
    result = _edgeweave("nodes", config=str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown key [coordinator] peer" in result.stderr
