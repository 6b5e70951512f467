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
from edgeweave.coordinator.discovery import NodeRecord, survey
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


def _source(record: NodeRecord) -> str:
    """The source column: where the node was found, and for one we do not use, why."""
    if record.note.startswith("another cluster"):
        return f"{record.source}, OTHER CLUSTER {record.cluster or '?'}"
    if record.note:
        return f"{record.source}, NO ANSWER"
    return record.source


def _cores(props: dict[str, str]) -> str:
    """The cores column: the affinity count, and the CPU quota where one caps it ("1 (0.25)")."""
    cores, quota = props.get("cores", "?"), props.get("cpu_cores", "")
    try:
        capped = float(quota) < float(cores)
    except ValueError:
        capped = False
    return f"{cores} ({quota})" if capped else cores


def nodes_table(records: list[NodeRecord], rtts: list[float | None], others: int = 0) -> Table:
    """One row per node. The address never wraps or shortens (its port is what --peer needs):
    the other columns fold instead on a narrow terminal."""
    title = f"{len(records) - others} edgeweave node(s)" + (f" + {others} not of this cluster or silent" if others else "")
    table = Table(title=title)
    for column in ("name", "address", "arch", "cores (quota)", "memory (avail/total)", "version", "source", "RTT ms"):
        if column in ("address", "RTT ms"):  # "unreachable" stays one word too
            table.add_column(column, no_wrap=True)
        else:
            table.add_column(column, overflow="fold")
    for r, rtt in zip(records, rtts, strict=True):
        p = r.properties
        table.add_row(
            r.name, r.address, p.get("arch", "?"), _cores(p),
            f"{_gib(p.get('mem_avail', ''))} / {_gib(p.get('mem_total', ''))}", r.version, _source(r),
            f"{rtt:.2f}" if rtt is not None else "unreachable",
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("nodes")
    def nodes(
        discovery_timeout: float = typer.Option(None, "--timeout", "--discovery-timeout",
                                                help="Seconds to listen for mDNS announcements."),
        interface: list[str] = typer.Option(None, help="IPv4 address(es) to browse on (default: all)."),
        peer: list[str] = typer.Option(None, metavar="HOST:PORT",
                                       help="Static node (repeatable), for networks without multicast."),
        wait_for: int = typer.Option(None, help="Return as soon as this many nodes are known."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        show_all: bool = typer.Option(False, "--all", help="Also list nodes of other clusters and announced "
                                                         "nodes that do not answer, marked."),
    ) -> None:
        """List the nodes of this cluster on the LAN (mDNS) and the static peers, with a measured
        round-trip time. A listed peer that does not answer is shown as unreachable; nodes of other
        clusters (another secret) are counted, and shown with --all."""
        seen = survey(timeout=discovery_timeout, interfaces=interface or None, peers=peer or [], wait_for=wait_for)
        # a listed peer always keeps its row (unreachable if it did not answer); others need --all
        records = seen.ours + [r for r in seen.others if r.source == "static"]
        others = [r for r in seen.others if r.source != "static"]
        rtts = [health_rtt_ms(r.address) if r.node_id else None for r in records]
        if show_all:
            records, rtts = records + others, rtts + [None] * len(others)
        elif others:
            typer.echo(f"{len(others)} announced node(s) not of this cluster or not answering are hidden; "
                       "--all lists them", err=True)
        if as_json:
            typer.echo(json.dumps([{**vars(r), "rtt_ms": rtt} for r, rtt in zip(records, rtts, strict=True)], indent=2))
            return
        if records:
            Console().print(nodes_table(records, rtts, len(others) if show_all else 0))
        else:
            where = f"on {', '.join(interface)}" if interface else "on any interface"
            typer.echo(f"no node announced itself {where} within {discovery_timeout:g} s. Start one with "
                       "`edgeweave node` on each device; where multicast does not pass (some Wi-Fi, VPNs), "
                       "list them with --peer HOST:PORT.")

    cluster = typer.Typer(help="Start or stop a local test cluster of node daemons.", no_args_is_help=True,
                          rich_markup_mode=None)
    app.add_typer(cluster, name="cluster")

    @cluster.command("up")
    def up(
        n: int = typer.Argument(3, help="Number of nodes."),
        base_dir: Path = typer.Option(None, help="Data dirs and logs (default: a new temp dir)."),
        interface: str = typer.Option("127.0.0.1", help="Address the nodes bind to and announce on."),
        advertise: bool = typer.Option(True, "--advertise/--no-advertise", help="Announce the nodes with mDNS."),
        state_file: Path = typer.Option(None, help="Where to record the cluster for `cluster down`."),
    ) -> None:
        """Start N node daemons in the background and print their addresses."""
        state_file = state_file or default_state_file()
        if state_file.exists():
            typer.echo(f"error: {state_file} exists; run `edgeweave cluster down` first", err=True)
            raise typer.Exit(1)
        try:
            local = LocalCluster(n, base_dir=base_dir, interface=interface, advertise=advertise, detach=True).start()
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
