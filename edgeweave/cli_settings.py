"""One settings path for every command: defaults < config.toml < `EDGEWEAVE_*` < flags.

`config.load_settings` resolves the first three into a `Settings`; `default_map` hands them to
Click as its default map, so every option bound in `BINDINGS` takes the configured value unless
its flag is given. Click applies the flag-over-default rule once, for every command, instead of
a `pick(flag, cfg.x)` per option in each command (which is how `run`, `nodes` and `plan` came to
ignore the file while `node` and `serve` honoured it).

A bound option declares no default of its own (`None`): the `Settings` dataclasses are the one
place defaults live, and `--help` shows the value that will be used, file and environment included.
(Two-sided booleans, `--advertise/--no-advertise`, repeat the dataclass default: Typer's help
reads a flag's own default, not the default map.)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from edgeweave.config import Settings

#: where a coordinator finds its nodes; shared by every command that talks to a cluster
_FIND_NODES = {
    "peer": "coordinator.peers",
    "interface": "coordinator.interface",
    "discovery_timeout": "coordinator.discovery_timeout",
}

#: command path -> {option's parameter name: "section.key"}
BINDINGS: dict[str, dict[str, str]] = {
    "node": {
        "name": "node.name",
        "host": "node.host",
        "port": "node.port",
        "data_port": "node.data_port",
        "data_dir": "node.data_dir",
        "interface": "node.interface",
        "memory_budget": "node.memory_budget",
        "shard_cache_max": "node.shard_cache_max",
        "max_frame_bytes": "node.max_frame_bytes",
        "max_data_connections": "node.max_data_connections",
        "data_idle_timeout": "node.data_idle_timeout",
        "data_frame_timeout": "node.data_frame_timeout",
        "advertise": "node.advertise",
        "session_grace_s": "node.session_grace_s",
        "job_idle_s": "node.job_idle_s",
        "secret_file": "cluster.secret_file",
        "insecure": "cluster.insecure",
    },
    "nodes": _FIND_NODES,
    "status": _FIND_NODES,
    "plan": {**_FIND_NODES, "nodes": "coordinator.nodes", "quantize": "coordinator.quantize",
             "cache_dir": "coordinator.cache_dir"},
    "run": {**_FIND_NODES, "nodes": "coordinator.nodes", "quantize": "coordinator.quantize",
            "cache_dir": "coordinator.cache_dir", "layout": "coordinator.layout", "speculate": "coordinator.speculate"},
    "serve": {**_FIND_NODES, "nodes": "coordinator.nodes", "quantize": "coordinator.quantize",
              "layout": "coordinator.layout",
              "cache_dir": "coordinator.cache_dir", "host": "coordinator.http_host", "port": "coordinator.http_port",
              "api_key": "coordinator.api_key", "max_body_bytes": "coordinator.max_body_bytes"},
    "cache list": {"cache_dir": "coordinator.cache_dir"},
    "cache prune": {"cache_dir": "coordinator.cache_dir"},
}


def setting(settings: Settings, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(settings, section), name)


def all_keys(settings: Settings) -> set[str]:
    """Every "section.key" a config file may set."""
    return {f"{s.name}.{f.name}" for s in fields(settings) for f in fields(getattr(settings, s.name))}


def find_command(root: Any, path: str) -> Any:
    """The Click command at `path` ("cache list") under the root group."""
    command = root
    for part in path.split():
        if part not in getattr(command, "commands", {}):
            raise LookupError(f"settings are bound to `{path}`, which is not a command")
        command = command.commands[part]
    return command


def default_map(settings: Settings, root: Any) -> dict[str, Any]:
    """Click's nested default map for every bound option. Empty values ("" or []) mean "not set"
    and leave the option's own None, so a command can still tell "not configured" apart."""
    result: dict[str, Any] = {}
    for path, options in BINDINGS.items():
        params = {p.name: p for p in find_command(root, path).params}
        target = result
        for part in path.split():
            target = target.setdefault(part, {})
        for name, key in options.items():
            if name not in params:
                raise LookupError(f"settings bind `{path} --{name.replace('_', '-')}`, which the command lacks")
            value = setting(settings, key)
            if value in ("", None) or value == []:
                continue
            if params[name].multiple and isinstance(value, str):
                value = [value]
            target[name] = value
    return result
