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

from edgeweave.config import ConfigError, load_settings, pick, pick_quantize
from edgeweave.coordinator.cli_llm import QUANTIZE_HELP
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
            arch=r.arch, cores=r.cpu_count, total_memory=r.total_memory, available_memory=health.available_memory,
            memory_budget=r.memory_budget, cpu_load=health.cpu_load, rss=health.rss, jobs=list(health.jobs),
            accelerators=list(r.accelerators), version=info.version, secure=info.secure, uptime_s=info.uptime_s,
            shard_store_bytes=health.shard_store_bytes, shard_store_max=health.shard_store_max,
        )
        rows.append(row)
    return rows


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
            row["name"], row["address"], row["arch"], str(row["cores"]), f"{row['cpu_load']:.2f}",
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
                 weights: list[float] | None = None, dtype: str = "float32", quantize: str | None = None) -> Any:
    """The engine to serve: the single-process reference, or the model spread over the cluster
    (the discovered/static nodes, else a LocalCluster of `nodes` started here)."""
    from edgeweave.coordinator import engine as engines
    from edgeweave.splitting.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(model)
    if engine_kind == "reference":
        if quantize not in (None, "none"):
            raise typer.BadParameter("the reference engine runs float32; use --engine cluster to quantize",
                                     param_hint="--quantize")
        return stack.enter_context(contextlib.closing(engines.ReferenceEngine(checkpoint)))
    if peers:  # static peers are the whole cluster: never mix in whatever else announces itself
        addresses = [r.address for r in discover(timeout=0, peers=peers, wait_for=len(peers))]
        if len(addresses) < len(peers):
            raise typer.BadParameter(f"only {len(addresses)} of {len(peers)} peers answered", param_hint="--peer")
    watcher = None
    if not peers:
        addresses = [r.address for r in discover(timeout=discovery_timeout, interfaces=interfaces)]
        if addresses:  # keep browsing: a node that restarts (or arrives) joins the next request
            from edgeweave.coordinator.discovery import NodeWatcher

            watcher = stack.enter_context(NodeWatcher(interfaces))
    if not addresses:
        from edgeweave.coordinator.local_cluster import LocalCluster

        typer.echo(f"no nodes found; starting a local cluster of {nodes} node(s)")
        cluster = stack.enter_context(LocalCluster(nodes, interface=(interfaces or ["127.0.0.1"])[0], advertise=False))
        addresses = list(cluster.addresses)
    return stack.enter_context(contextlib.closing(
        engines.DistributedEngine.open(checkpoint, addresses, weights=weights, dtype=dtype, watcher=watcher,
                                       quantize=quantize)))


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
        host: str = typer.Option(None, help="HTTP address to bind (default: config http_host, 127.0.0.1)."),
        port: int = typer.Option(None, help="HTTP port (default: config http_port, 8000)."),
        peer: list[str] = typer.Option(None, help="Static node host:port (repeatable); given peers are the whole cluster."),
        interface: list[str] = typer.Option(None, help="IPv4 address(es) to discover nodes on (without --peer)."),
        nodes: int = typer.Option(None, help="Nodes of the local cluster started when none is found."),
        discovery_timeout: float = typer.Option(None, help="Seconds to listen for nodes."),
        engine: str = typer.Option("cluster", help="'cluster' (tensor parallel over nodes) or 'reference' (one process)."),
        weights: str = typer.Option(None, help="Relative node capacities, e.g. 2,1 (default: measured GFLOP/s)."),
        dtype: str = typer.Option("float32", help="Shard dtype on disk and on the wire: float32, float16, bfloat16."),
        quantize: str = typer.Option(None, help=QUANTIZE_HELP),
        max_active: int = typer.Option(16, help="Requests decoded together: rows of one batched step, one KV cache each."),
        prefill_chunk: int = typer.Option(DEFAULT_PREFILL_CHUNK, help="Prompt tokens read per step across new "
                                          "requests (the rest next step), so running streams keep flowing."),
        max_queue: int = typer.Option(64, help="Requests allowed to wait; more get HTTP 429."),
        api_key: str = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1/ (default: config "
                                               "api_key, env EDGEWEAVE_COORDINATOR_API_KEY)."),
        no_api_key: bool = typer.Option(False, "--no-api-key", help="Serve a non-loopback address without a key."),
        max_body_bytes: int = typer.Option(None, help="Largest request body; larger ones get HTTP 413 "
                                                      "(default: config max_body_bytes, 4 MiB)."),
    ) -> None:
        """Serve the model with an OpenAI-compatible API (/v1/chat/completions, /v1/completions)."""
        import uvicorn

        from edgeweave.coordinator.cli_llm import parse_weights
        from edgeweave.coordinator.http_api import create_app
        from edgeweave.coordinator.scheduler import Scheduler
        from edgeweave.runtime.quantized import QuantizationError
        from edgeweave.splitting.checkpoints import CheckpointError

        if engine not in ("cluster", "reference"):
            raise typer.BadParameter("use 'cluster' or 'reference'", param_hint="--engine")
        cfg = load_settings().coordinator
        try:
            precision = pick_quantize(quantize, cfg.quantize)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--quantize") from None
        bind_host, bind_port = pick(host, cfg.http_host), pick(port, cfg.http_port)
        key = pick(api_key, cfg.api_key) or None
        check_exposure(bind_host, key, no_api_key)
        body_limit = pick(max_body_bytes, cfg.max_body_bytes)
        if max_active < 1 or prefill_chunk < 1 or max_queue < 0:
            raise typer.BadParameter("--max-active and --prefill-chunk must be >= 1 and --max-queue >= 0")
        if body_limit < 1024:
            raise typer.BadParameter(f"must be at least 1024 bytes, got {body_limit}", param_hint="--max-body-bytes")
        with contextlib.ExitStack() as stack:
            peers = pick(peer or None, cfg.peers) or []
            try:
                text_engine = build_engine(
                    model, engine, peers, pick(interface or None, [cfg.interface] if cfg.interface else None),
                    pick(nodes, cfg.nodes), pick(discovery_timeout, cfg.discovery_timeout), stack,
                    parse_weights(weights, len(peers) or None), dtype, precision,
                )
            except (CheckpointError, QuantizationError) as exc:
                raise typer.BadParameter(str(exc), param_hint="MODEL") from None
            scheduler = Scheduler(text_engine, max_active=max_active, max_queue=max_queue, prefill_chunk=prefill_chunk)
            stack.callback(scheduler.close)
            typer.echo(f"serving {text_engine.model_id} on http://{bind_host}:{bind_port}/v1"
                       + (" (API key required)" if key else ""))
            uvicorn.run(create_app(text_engine, scheduler, api_key=key, max_body_bytes=body_limit),
                        host=bind_host, port=bind_port, log_level="warning")

    @app.command("status")
    def status(
        peer: list[str] = typer.Option(None, help="Static node host:port (repeatable)."),
        interface: list[str] = typer.Option(None, help="IPv4 address(es) to browse on (default: all)."),
        timeout: float = typer.Option(2.0, help="Seconds to listen for mDNS announcements."),
        server: str = typer.Option(None, help="URL of a running `edgeweave serve`, e.g. http://127.0.0.1:8000."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ) -> None:
        """The cluster's nodes (memory, cores, load) and, with --server, the served model, plan and speed."""
        cfg = load_settings().coordinator
        records = discover(timeout=timeout, interfaces=pick(interface or None, [cfg.interface] if cfg.interface else None),
                           peers=pick(peer or None, cfg.peers) or [])
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
