"""`edgeweave nodes` (who is out there) and `edgeweave cluster up|down` (a local test cluster)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from pathlib import Path

import psutil
import typer
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.discovery import NodeRecord, discover
from edgeweave.coordinator.local_cluster import ClusterStartError, LocalCluster


def default_state_file() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeweave" / "cluster.json"


def health_rtt_ms(address: str, calls: int = 5, timeout: float = 2.0) -> float | None:
    """Median Health round trip in ms (None if the node does not answer)."""
    try:
        with NodeClient(address, timeout=timeout) as client:
            client.health()  # connects
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                client.health()
                samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    except NodeError:
        return None


def _gib(value: str) -> str:
    try:
        return f"{int(value) / 2**30:.1f} GiB"
    except ValueError:
        return "?"


def nodes_table(records: list[NodeRecord], rtts: list[float | None]) -> Table:
    table = Table(title=f"{len(records)} edgeweave node(s)")
    for column in ("name", "address", "arch", "cores", "memory (avail/total)", "version", "source", "RTT ms"):
        table.add_column(column)
    for r, rtt in zip(records, rtts, strict=True):
        p = r.properties
        table.add_row(
            r.name, r.address, p.get("arch", "?"), p.get("cores", "?"),
            f"{_gib(p.get('mem_avail', ''))} / {_gib(p.get('mem_total', ''))}", r.version, r.source,
            f"{rtt:.2f}" if rtt is not None else "unreachable",
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("nodes")
    def nodes(
        timeout: float = typer.Option(2.0, help="Seconds to listen for mDNS announcements."),
        interface: list[str] = typer.Option(None, help="IPv4 address(es) to browse on (default: all)."),
        peer: list[str] = typer.Option(None, help="Static node host:port (repeatable), for networks without multicast."),
        wait_for: int = typer.Option(None, help="Return as soon as this many nodes are known."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List the nodes on the LAN (mDNS) and the static peers, with a measured round-trip time."""
        records = discover(timeout=timeout, interfaces=interface or None, peers=peer or (), wait_for=wait_for)
        rtts = [health_rtt_ms(r.address) for r in records]
        if as_json:
            typer.echo(json.dumps([{**vars(r), "rtt_ms": rtt} for r, rtt in zip(records, rtts, strict=True)], indent=2))
        else:
            Console().print(nodes_table(records, rtts))

    cluster = typer.Typer(help="Start or stop a local test cluster of node daemons.", no_args_is_help=True)
    app.add_typer(cluster, name="cluster")

    @cluster.command("up")
    def up(
        n: int = typer.Argument(3, help="Number of nodes."),
        base_dir: Path = typer.Option(None, help="Data dirs and logs (default: a new temp dir)."),
        interface: str = typer.Option("127.0.0.1", help="Address the nodes bind to and announce on."),
        no_advertise: bool = typer.Option(False, "--no-advertise", help="Do not announce with mDNS."),
        state_file: Path = typer.Option(None, help="Where to record the cluster for `cluster down`."),
    ) -> None:
        """Start N node daemons in the background and print their addresses."""
        state_file = state_file or default_state_file()
        if state_file.exists():
            typer.echo(f"error: {state_file} exists; run `edgeweave cluster down` first", err=True)
            raise typer.Exit(1)
        try:
            local = LocalCluster(n, base_dir=base_dir, interface=interface, advertise=not no_advertise, detach=True).start()
        except ClusterStartError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(local.state(), indent=2))
        for name, address in zip(local.names, local.addresses, strict=True):
            typer.echo(f"{name} {address}")
        typer.echo(f"state in {state_file}; stop with `edgeweave cluster down`")

    @cluster.command("down")
    def down(state_file: Path = typer.Option(None, help="The state file written by `cluster up`.")) -> None:
        """Stop the nodes started by `cluster up` (SIGTERM, then SIGKILL after 10 s)."""
        state_file = state_file or default_state_file()
        if not state_file.exists():
            typer.echo(f"no cluster recorded in {state_file}")
            raise typer.Exit(0)
        state = json.loads(state_file.read_text())
        procs = []
        for node in state["nodes"]:
            try:
                proc = psutil.Process(node["pid"])
                if "node" in proc.cmdline() and any("edgeweave" in part for part in proc.cmdline()):
                    proc.send_signal(signal.SIGTERM)
                    procs.append(proc)
            except (psutil.NoSuchProcess, TypeError):
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            proc.kill()
        state_file.unlink()
        typer.echo(f"stopped {len(procs)} node(s); data and logs stay in {state['base_dir']}")
