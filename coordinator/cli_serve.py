"""`edgeweave serve` (OpenAI-compatible HTTP server over the cluster) and `edgeweave status`."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgeweave.coordinator.cli_llm import LAYOUT_HELP, LOCAL_BUDGET_HELP, PEER_HELP, QUANTIZE_HELP
from edgeweave.coordinator.client import NodeClient, NodeError
from edgeweave.coordinator.discovery import NodeRecord, discover
from edgeweave.runtime.batch import DEFAULT_PREFILL_CHUNK

log = logging.getLogger(__name__)


# -- edgeweave status ----------------------------------------------------------------------------
def node_rows(records: list[NodeRecord]) -> list[dict[str, Any]]:
    """Each node's live resources from its Info and Health RPCs (unreachable nodes say so)."""
    rows = []
    for record in records:
        row: dict[str, Any] = {"name": record.name, "address": record.address, "source": record.source}
        try:
            with NodeClient(record.address, timeout=3.0) as client:
                info, health = client.info(), client.health()
        except NodeError as exc:
            row["error"] = exc.message
            rows.append(row)
            continue
        r = info.resources
        row.update(
            arch=r.arch, cores=r.cpu_count, cpu_cores=r.cpu_cores, total_memory=r.total_memory,
            available_memory=health.available_memory,
            memory_budget=r.memory_budget, cpu_load=health.cpu_load, rss=health.rss, jobs=list(health.jobs),
            accelerators=list(r.accelerators), version=info.version, secure=info.secure, uptime_s=info.uptime_s,
            shard_store_bytes=health.shard_store_bytes, shard_store_max=health.shard_store_max,
        )
        rows.append(row)
    return rows


def _cores(cores: int, quota: float) -> str:
    """The affinity count, and the cgroup CPU quota where it caps it: "1 (0.25)"."""
    return f"{cores} ({quota:.3g})" if 0 < quota < cores else str(cores)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def _human(n: int) -> str:
    """A shard store's size: GiB for large ones, MiB for the small ones a test or a tiny model fills."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def nodes_status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"cluster: {len(rows)} node(s)")
    for column in ("name", "address", "arch", "cores", "load", "memory avail/total", "budget", "node RSS",
                   "shards/bound", "jobs", "TLS"):
        table.add_column(column)
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], row["address"], "[red]unreachable[/red]", "", "", row["error"][:60], "", "", "",
                          "", "")
            continue
        table.add_row(
            row["name"], row["address"], row["arch"], _cores(row["cores"], row["cpu_cores"]), f"{row['cpu_load']:.2f}",
            f"{_gib(row['available_memory'])} / {_gib(row['total_memory'])}",
            _gib(row["memory_budget"]) if row["memory_budget"] else "unlimited", _gib(row["rss"]),
            f"{_human(row['shard_store_bytes'])} / "
            + (_human(row["shard_store_max"]) if row["shard_store_max"] else "unlimited"),
            str(len(row["jobs"])), "yes" if row["secure"] else "no",
        )
    return table


def fetch_server_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET <url>/v1/status of a running `edgeweave serve`; raises OSError with the reason."""
    with urllib.request.urlopen(url.rstrip("/") + "/v1/status", timeout=timeout) as reply:  # noqa: S310 (user URL)
        return json.loads(reply.read())


def server_tables(status: dict[str, Any]) -> list[Table]:
    engine, sched = status.get("engine", {}), status.get("scheduler", {})
    summary = Table(title=f"server: {status.get('model')}", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    rate, ttft = sched.get("median_tokens_per_s"), sched.get("median_ttft_s")
    for key, value in (
        ("engine", engine.get("engine", "?")),
        ("layers", engine.get("layers", "?")),
        ("requests active / waiting", f"{sched.get('active')} / {sched.get('waiting')} (max {sched.get('max_active')} / {sched.get('max_queue')})"),
        ("recent requests", sched.get("recent_requests")),
        ("median decode tokens/s", f"{rate:.1f}" if rate else "n/a"),
        ("median time to first token", f"{ttft * 1e3:.0f} ms" if ttft is not None else "n/a"),
        ("uptime", f"{status.get('uptime_s', 0):.0f} s"),
    ):
        summary.add_row(key, str(value))
    plan = Table(title="plan: heads and MLP columns per node")
    for column in ("node", "address", "KV heads", "query heads", "MLP columns"):
        plan.add_column(column)
    for node in engine.get("nodes", []):
        plan.add_row(str(node.get("name", "?")), str(node.get("address", "?")), str(node.get("kv_heads", "?")),
                     str(node.get("q_heads", "?")), str(node.get("columns", "?")))
    recent = Table(title="recent requests")
    for column in ("id", "client", "prompt", "completion", "ttft ms", "tok/s", "finish"):
        recent.add_column(column)
    for r in sched.get("recent", []):
        recent.add_row(r["id"], r["client"], str(r["prompt_tokens"]), str(r["completion_tokens"]),
                       f"{r['ttft_s'] * 1e3:.0f}" if r.get("ttft_s") is not None else "n/a",
                       f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "n/a", str(r["finish_reason"]))
    return [summary, plan, recent]


# -- edgeweave serve -----------------------------------------------------------------------------
def build_engine(model: str | None, engine_kind: str, peers: list[str], interfaces: list[str] | None,
                 nodes: int, discovery_timeout: float, stack: contextlib.ExitStack,
                 weights: list[float] | None = None, dtype: str = "float32", quantize: str | None = None,
                 cache_dir: str | None = None, memory_budget: str | None = None, layout: Any = "tensor") -> Any:
    """The engine to serve: the single-process reference, or the model spread over the cluster
    (the discovered/static nodes, else a LocalCluster of `nodes` started here)."""
    from edgeweave.coordinator import engine as engines
    from edgeweave.splitting.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(model)
    if engine_kind == "reference":
        if quantize not in (None, "none"):
            raise typer.BadParameter("the reference engine runs float32; use --engine cluster to quantize",
                                     param_hint="--quantize")
        if memory_budget:
            raise typer.BadParameter("the reference engine runs in this process; the budget is for the nodes of a "
                                     "local cluster (--engine cluster)", param_hint="--memory-budget")
        if layout != "tensor":
            raise typer.BadParameter("the reference engine runs every layer in this process; a layout is for "
                                     "--engine cluster", param_hint="--layout")
        return stack.enter_context(contextlib.closing(engines.ReferenceEngine(checkpoint)))
    from edgeweave.coordinator.cli_llm import check_local_budget, find_nodes_or_fail

    # static peers are the whole cluster (each must answer): never mix in whatever else announces itself
    addresses = [r.address for r in find_nodes_or_fail(peers, interfaces, discovery_timeout)]
    watcher = None
    if addresses and not peers:  # keep browsing: a node that restarts (or arrives) joins the next request
        from edgeweave.coordinator.discovery import NodeWatcher

        watcher = stack.enter_context(NodeWatcher(interfaces))
    check_local_budget(memory_budget, addresses)
    if not addresses:
        from edgeweave.coordinator.local_cluster import LocalCluster

        log.info("no nodes found; starting a local cluster of %d node(s)", nodes)
        cluster = stack.enter_context(LocalCluster(nodes, interface=(interfaces or ["127.0.0.1"])[0], advertise=False,
                                                   memory_budgets=[memory_budget] * nodes if memory_budget else None))
        addresses = list(cluster.addresses)
    return stack.enter_context(contextlib.closing(
        engines.DistributedEngine.open(checkpoint, addresses, weights=weights, dtype=dtype, watcher=watcher,
                                       quantize=quantize, cache_dir=cache_dir, layout=layout)))


def check_exposure(host: str, api_key: str | None, no_api_key: bool) -> None:
    """Refuse to serve beyond this machine without a key, unless told to (`--no-api-key`)."""
    if api_key and no_api_key:
        raise typer.BadParameter("--api-key and --no-api-key contradict each other; give one", param_hint="--no-api-key")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key and not no_api_key:
        raise typer.BadParameter(
            f"{host} is reachable from other machines, and anyone there could use the cluster: give --api-key "
            "(or [coordinator] api_key, EDGEWEAVE_COORDINATOR_API_KEY), or --no-api-key to serve it open",
            param_hint="--host")


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Argument(None, help="GGUF file or HF folder (default: the bundled SmolLM2-135M-Instruct)."),
        host: str = typer.Option(None, help="HTTP address to bind."),
        port: int = typer.Option(None, help="HTTP port."),
        peer: list[str] = typer.Option(None, metavar="HOST:PORT", help=PEER_HELP),
        interface: list[str] = typer.Option(None, help="IPv4 address(es) to discover nodes on (without --peer)."),
        nodes: int = typer.Option(None, help="Nodes of the local cluster started when none is found."),
        discovery_timeout: float = typer.Option(None, help="Seconds to listen for nodes."),
        engine: str = typer.Option("cluster", help="'cluster' (tensor parallel over nodes) or 'reference' (one process)."),
        weights: str = typer.Option(None, help="Relative node capacities, e.g. 2,1 (default: measured GFLOP/s)."),
        dtype: str = typer.Option("float32", help="Shard dtype on disk and on the wire: float32, float16, bfloat16."),
        quantize: str = typer.Option(None, help=QUANTIZE_HELP),
        cache_dir: str = typer.Option(None, help="Where this coordinator keeps written shards."),
        memory_budget: str = typer.Option(None, help=LOCAL_BUDGET_HELP),
        layout: str = typer.Option(None, help=LAYOUT_HELP),
        max_active: int = typer.Option(16, help="Requests decoded together: rows of one batched step, one KV cache each."),
        prefill_chunk: int = typer.Option(DEFAULT_PREFILL_CHUNK, help="Prompt tokens read per step across new "
                                          "requests (the rest next step), so running streams keep flowing."),
        max_queue: int = typer.Option(64, help="Requests allowed to wait; more get HTTP 429."),
        api_key: str = typer.Option(None, show_default=False, help="Require 'Authorization: Bearer KEY' on /v1/ "
                                    "(also [coordinator] api_key, env EDGEWEAVE_COORDINATOR_API_KEY)."),
        no_api_key: bool = typer.Option(False, "--no-api-key", help="Serve a non-loopback address without a key."),
        max_body_bytes: int = typer.Option(None, help="Largest request body; larger ones get HTTP 413."),
    ) -> None:
        """Serve the model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions).

        The HTTP port is bound before the model is loaded (a busy port fails at once), and the
        "serving" line is printed only once the server accepts connections."""
        from edgeweave.coordinator.cli_llm import parse_weights, planning_errors, resolve_layout, resolve_quantize
        from edgeweave.coordinator.http_api import create_app
        from edgeweave.coordinator.http_server import AnnouncingServer, bind_http, url_host
        from edgeweave.coordinator.scheduler import Scheduler
        from edgeweave.runtime.quantized import QuantizationError
        from edgeweave.splitting.checkpoints import CheckpointError
        from edgeweave.splitting.layouts import LayoutError
        from edgeweave.splitting.tokenizer import TokenizerError

        if engine not in ("cluster", "reference"):
            raise typer.BadParameter("use 'cluster' or 'reference'", param_hint="--engine")
        precision = resolve_quantize(quantize)
        layout_request = resolve_layout(layout, weights)
        key = api_key or None
        check_exposure(host, key, no_api_key)
        if max_active < 1 or prefill_chunk < 1 or max_queue < 0:
            raise typer.BadParameter("--max-active and --prefill-chunk must be >= 1 and --max-queue >= 0")
        if max_body_bytes < 1024:
            raise typer.BadParameter(f"must be at least 1024 bytes, got {max_body_bytes}", param_hint="--max-body-bytes")
        with contextlib.ExitStack() as stack:
            try:
                listener = stack.enter_context(bind_http(host, port))
            except OSError as exc:
                raise typer.BadParameter(str(exc), param_hint="--port") from None
            unplannable = planning_errors() if layout_request == "auto" else ()
            try:
                text_engine = build_engine(
                    model, engine, peer or [], interface or None, nodes, discovery_timeout, stack,
                    parse_weights(weights, len(peer) if peer else None), dtype, precision, cache_dir, memory_budget,
                    layout_request,
                )
            except (CheckpointError, QuantizationError, TokenizerError, LayoutError) as exc:
                raise typer.BadParameter(str(exc), param_hint="MODEL") from None
            except unplannable as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            scheduler = Scheduler(text_engine, max_active=max_active, max_queue=max_queue, prefill_chunk=prefill_chunk)
            stack.callback(scheduler.close)
            bound_host, bound_port = listener.getsockname()[:2]
            announcement = (f"serving {text_engine.model_id} on http://{url_host(bound_host)}:{bound_port}/v1"
                            + (" (API key required)" if key else ""))
            server = AnnouncingServer(create_app(text_engine, scheduler, api_key=key, max_body_bytes=max_body_bytes),
                                      lambda: typer.echo(announcement))
            server.run(sockets=[listener])

    @app.command("status")
    def status(
        peer: list[str] = typer.Option(None, metavar="HOST:PORT", help="Static node (repeatable)."),
        interface: list[str] = typer.Option(None, help="IPv4 address(es) to browse on (default: all)."),
        discovery_timeout: float = typer.Option(None, "--timeout", "--discovery-timeout",
                                                help="Seconds to listen for mDNS announcements."),
        server: str = typer.Option(None, help="URL of a running `edgeweave serve`, e.g. http://127.0.0.1:8000."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """The cluster's nodes (memory, cores, load) and, with --server, the served model, plan and speed."""
        records = discover(timeout=discovery_timeout, interfaces=interface or None, peers=peer or [])
        report: dict[str, Any] = {"nodes": node_rows(records)}
        if server:
            try:
                report["server"] = fetch_server_status(server)
            except (OSError, ValueError) as exc:
                report["server_error"] = f"{server} did not answer /v1/status: {exc}"
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        console = Console()
        console.print(nodes_status_table(report["nodes"]))
        for table in server_tables(report["server"]) if "server" in report else []:
            console.print(table)
        if "server_error" in report:
            console.print(f"[red]{report['server_error']}[/red]")


__all__ = ["register", "node_rows", "fetch_server_status", "server_tables", "build_engine"]
