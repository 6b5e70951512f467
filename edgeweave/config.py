"""Settings for nodes and coordinators: defaults < TOML file < environment < command-line flags.

The file is `$EDGEWEAVE_CONFIG`, else `~/.config/edgeweave/config.toml`:

    [cluster]
    secret_file = "~/.config/edgeweave/cluster.secret"
    insecure = false

    [node]
    name = "pi-kitchen"
    port = 50551
    memory_budget = "1.5GiB"
    shard_cache_max = "8GiB"   # the shard store's size bound: least recently used shards go first; "0" = unlimited
    max_frame_bytes = "256MiB" # largest Forward frame / gRPC message received (64 MiB per 2048 tokens at hidden 8192)
    max_data_connections = 16  # open data-plane connections; more are refused
    data_idle_timeout = 300.0  # s a data-plane connection may wait for its next frame (coordinators reconnect)
    data_frame_timeout = 120.0 # s one frame may take to arrive whole

    [coordinator]
    peers = ["10.0.0.7:50551"]
    http_port = 8000
    quantize = "q4"        # q4 | q8 | none; unset keeps the model file's own precision
    speculate = 8          # run: verify up to 8 prompt-lookup draft tokens per pass (greedy runs; 0 = off)
    api_key = "..."        # serve: clients must send "Authorization: Bearer ..." (or EDGEWEAVE_COORDINATOR_API_KEY)

An environment variable `EDGEWEAVE_<SECTION>_<KEY>` (e.g. `EDGEWEAVE_NODE_PORT=6000`) overrides
the file; a flag given on the command line overrides both (`edgeweave.cli_settings` binds each
key to the options of the commands that have it). Unknown keys are an error, so a typo never
silently does nothing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """The config file or an override is invalid; the text names the key and the fix."""


@dataclass
class ClusterSettings:
    secret_file: str = ""
    insecure: bool = False


@dataclass
class NodeSettings:
    name: str = ""
    host: str = "0.0.0.0"
    port: int = 50551
    data_port: int = -1  # -1: port + 1 (0 when port is 0); 0: ephemeral
    data_dir: str = ""
    interface: str = ""
    memory_budget: str = "0"
    shard_cache_max: str = "8GiB"  # bound on the node's shard store (LRU eviction); "0" = unlimited
    # what one peer may cost the node (node/limits.py says why these values; keep them equal)
    max_frame_bytes: str = "256MiB"  # largest data-plane frame and gRPC message received
    max_data_connections: int = 16
    data_idle_timeout: float = 300.0  # seconds
    data_frame_timeout: float = 120.0  # seconds
    advertise: bool = True
    #: seconds a coordinator's KV sessions outlive its last Forward stream (a reconnect within it keeps
    #: them): long enough for a reconnect, short enough that crash-restart loops cannot fill the cap
    session_grace_s: float = 5.0
    #: seconds a loaded model that no coordinator holds stays loaded (a coordinator restarted within it
    #: reuses the job instead of reloading it); an idle coordinator's open stream keeps it regardless
    job_idle_s: float = 300.0


@dataclass
class CoordinatorSettings:
    peers: list[str] = field(default_factory=list)
    interface: str = ""
    discovery_timeout: float = 2.0
    nodes: int = 2
    cache_dir: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    quantize: str = ""  # "" keeps the model file's precision class; q4, q8 or none
    layout: str = "tensor"  # tensor, pipeline, auto (the planner picks), or stages: pipeline:12,18 / hybrid:12x2,18x1
    api_key: str = ""  # `edgeweave serve` requires "Authorization: Bearer <api_key>" when set
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get HTTP 413 before they are parsed
    #: `edgeweave run`'s speculative draft per pass (0 = off; coordinator/speculative.py): the same
    #: greedy tokens in fewer passes where drafts are accepted; sampled runs do not speculate
    speculate: int = 8


@dataclass
class Settings:
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(os.environ.get("EDGEWEAVE_CONFIG", Path(base) / "edgeweave" / "config.toml"))


def _coerce(section: str, key: str, current: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the type of the default, with a clear error."""
    where = f"[{section}] {key}"
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if isinstance(current, list):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where} must be a list of strings, not {value!r}")
    try:
        return type(current)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a {type(current).__name__}, not {value!r}") from None


def _apply(settings: Settings, section: str, values: dict[str, Any], origin: str) -> None:
    target = getattr(settings, section)
    known = {f.name for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown key [{section}] {key}; known keys: {', '.join(sorted(known))}")
        setattr(target, key, _coerce(section, key, getattr(target, key), value))


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file (if present), then EDGEWEAVE_<SECTION>_<KEY> variables."""
    settings = Settings()
    path = Path(path) if path else default_config_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if section not in {f.name for f in fields(settings)} or not isinstance(values, dict):
                raise ConfigError(f"{path}: unknown section [{section}]; use [cluster], [node] or [coordinator]")
            _apply(settings, section, values, str(path))
    env = os.environ if environ is None else environ
    for section in ("cluster", "node", "coordinator"):
        prefix = f"EDGEWEAVE_{section.upper()}_"
        overrides = {k[len(prefix):].lower(): v for k, v in env.items() if k.startswith(prefix)}
        if overrides:
            _apply(settings, section, overrides, "environment")
    return settings


def pick_quantize(flag: str | None, configured: str) -> str | None:
    """--quantize, else [coordinator] quantize, else None (the file's own precision); refused when unknown."""
    from edgeweave.runtime.quantized import QUANTIZE_CHOICES

    value = flag if flag is not None else (configured or None)
    if value is not None and value not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {value!r}")
    return value


