"""`edgeweave node`: run a node daemon on this device."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import typer

from edgeweave import security
from edgeweave.node.daemon import NodeOptions, serve
from edgeweave.node.limits import Limits
from edgeweave.runtime.resources import parse_memory_budget, parse_size


def register(app: typer.Typer) -> None:
    @app.command("node")
    def node(
        name: str = typer.Option(None, help="Node name shown in discovery (default: host name)."),
        host: str = typer.Option(None, help="Address to bind the gRPC server to."),
        port: int = typer.Option(None, help="gRPC port (0 picks a free one)."),
        data_port: int = typer.Option(None, help="Raw-TCP data plane port for activations (-1: --port + 1; 0 = free one)."),
        data_dir: Path = typer.Option(None, help="Shard store and node id (default ~/.local/share/edgeweave/NAME)."),
        interface: str = typer.Option(None, help="IPv4 address to announce on with mDNS (default: --host, else all)."),
        memory_budget: str = typer.Option(None, help="Memory for weights: 2GiB, 512MB, 0.5 (of free RAM), bytes; 0 = unlimited."),
        shard_cache_max: str = typer.Option(
            None, help="Bound on the shard store, e.g. 8GiB; least recently used shards no loaded job needs are "
                       "evicted beyond it; 0 = unlimited."),
        max_frame_bytes: str = typer.Option(
            None, help="Largest Forward frame or gRPC message the node receives, e.g. 256MiB (longer prompts "
                       "need more: 64 MiB per 2048 tokens at hidden 8192 in float32)."),
        max_data_connections: int = typer.Option(None, help="Open data-plane connections allowed; more are refused."),
        data_idle_timeout: float = typer.Option(
            None, help="Seconds a data-plane connection may wait for its next frame before it is closed."),
        data_frame_timeout: float = typer.Option(
            None, help="Seconds one data-plane frame may take to arrive (or its reply to be taken)."),
        advertise: bool = typer.Option(True, "--advertise/--no-advertise", help="Announce with mDNS (off for static --peer setups)."),
        session_grace_s: float = typer.Option(
            None, help="Seconds a coordinator's KV sessions outlive its last Forward stream (freed after, e.g. "
                       "when it was killed); a coordinator reconnecting within it keeps them."),
        job_idle_s: float = typer.Option(
            None, help="Seconds a loaded model that no coordinator's stream holds stays loaded before it is unloaded."),
        ready_file: Path = typer.Option(None, help="Write {address, port, pid, name} as JSON here once serving."),
        watch_fd: int = typer.Option(
            None, hidden=True, help="Inherited pipe fd: stop when it reads EOF (the launcher died; LocalCluster)."),
        emulate_cpu_fraction: float = typer.Option(
            1.0, hidden=True, help="Test beds: emulate a device this fraction (0-1] as fast as this host's core, by "
                                   "idling after each message for the rest of its time (runtime/cpu_dilation.py)."),
        secret_file: Path = typer.Option(None, help="Cluster secret (default ~/.config/edgeweave/cluster.secret)."),
        insecure: bool = typer.Option(False, "--insecure/--secure", help="Plaintext, unauthenticated gRPC: local trials only."),
    ) -> None:
        """Serve this device's compute to a coordinator until Ctrl-C / SIGTERM.

        Every option but --ready-file and --watch-fd may also come from [node] (and [cluster]) in config.toml or
        EDGEWEAVE_NODE_* variables; the flag wins."""
        name = name or socket.gethostname().split(".")[0]
        try:
            budget = parse_memory_budget(memory_budget)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--memory-budget") from None
        try:
            store_bound = parse_size(shard_cache_max, "shard cache bound")
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--shard-cache-max") from None
        try:
            frame_bytes = parse_size(max_frame_bytes, "max frame size")
        except ValueError:
            raise typer.BadParameter(f"{max_frame_bytes!r} is not a size; use e.g. 256MiB or a byte count",
                                     param_hint="--max-frame-bytes") from None
        try:
            limits = Limits(frame_bytes, max_data_connections, data_idle_timeout, data_frame_timeout)
        except ValueError as exc:
            raise typer.BadParameter(f"{exc} (a flag, [node] in config.toml or EDGEWEAVE_NODE_*)") from None
        for flag, seconds in (("--session-grace-s", session_grace_s), ("--job-idle-s", job_idle_s)):
            if not (math.isfinite(seconds) and seconds >= 0):
                raise typer.BadParameter(f"must be a finite number of seconds >= 0, not {seconds!r}", param_hint=flag)
        if not (0 < emulate_cpu_fraction <= 1):
            raise typer.BadParameter(f"must be in (0, 1], not {emulate_cpu_fraction!r}",
                                     param_hint="--emulate-cpu-fraction")
        try:
            tls = security.resolve_tls(str(secret_file) if secret_file else None, bool(insecure), name)
        except security.SecretError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        default_dir = Path.home() / ".local" / "share" / "edgeweave" / name
        serve(NodeOptions(
            name=name,
            host=host,
            port=port,
            data_port=data_port,
            data_dir=Path(data_dir or default_dir).expanduser(),
            interface=interface or None,
            memory_budget=budget,
            shard_cache_max=store_bound,
            advertise=advertise,
            ready_file=ready_file,
            credentials=security.server_credentials(tls) if tls else None,
            tls=tls,
            limits=limits,
            session_grace_s=session_grace_s,
            job_idle_s=job_idle_s,
            watch_fd=watch_fd,
            emulate_cpu_fraction=emulate_cpu_fraction,
        ))
