"""`edgeweave run` and `edgeweave plan`: generate text with a model spread over nodes, or show the cut."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgeweave.splitting.checkpoints import CheckpointError, open_checkpoint
from edgeweave.splitting.layouts import Layout, LayoutError, parse_layout

MODEL_HELP = "GGUF file or Hugging Face folder (default: the bundled SmolLM2-135M-Instruct)."
QUANTIZE_HELP = ("Weight precision of the shards: q4, q8 or none (float32). Default: [coordinator] quantize, else "
                 "the file's own (a Q4 GGUF stays 4-bit, exactly; a HF folder stays float).")
LAYOUT_HELP = ("Which node holds which layers: tensor (every node a share of every layer), pipeline (each node a "
               "range of whole layers, in proportion to its capacity), auto (the planner measures the nodes and "
               "links, runs the fastest predicted layout, and re-plans when a link moves; `edgeweave plan` shows "
               "its prediction), or stages given exactly: pipeline:12,18 (layers per node) or hybrid:12x2,18x1 "
               "(layers x nodes per stage).")
PEER_HELP = "Static node host:port (repeatable). Given peers are the whole cluster: each must answer."
INTERFACE_HELP = "IPv4 address to discover nodes on (and to bind a local cluster to)."
DISCOVERY_HELP = "Seconds to listen for mDNS announcements (0: only --peer, else a local cluster)."

LOCAL_BUDGET_HELP = ("Memory budget of each node of the local cluster started here (e.g. 600MiB): they stream "
                     "layers through a sliding window when it is short. Nodes found on the network keep their own.")

SPECULATE_HELP = ("Speculative decoding: verify up to K tokens guessed by prompt lookup per pass over the nodes "
                  "(exactly the greedy tokens, in fewer round trips where the text repeats itself; fewer "
                  "guesses while they keep being wrong; 0 = off). "
                  "Greedy only: sampled runs speculate only when asked here, and that is refused. "
                  "Default: [coordinator] speculate.")

log = logging.getLogger(__name__)


def from_command_line(ctx: typer.Context, name: str) -> bool:
    """True when option `name` was given on the command line (not a default or a configured value)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def resolve_speculate(flag: int | None, temperature: float, explicit: bool) -> int:
    """Draft tokens per pass: --speculate or [coordinator] speculate (bound by edgeweave.cli_settings),
    which applies to greedy runs; BadParameter when out of range, or asked for on the command line of a
    sampled run (speculation verifies greedy choices only)."""
    from edgeweave.config import CoordinatorSettings
    from edgeweave.coordinator.speculative import SpeculationError, check_draft, check_request
    from edgeweave.runtime.sampling import SamplingParams

    draft = CoordinatorSettings.speculate if flag is None else flag
    try:
        check_draft(draft)
        if temperature > 0 and not explicit:
            return 0  # the configured speculation is for greedy runs
        check_request(draft, SamplingParams(temperature=max(temperature, 0.0)))
    except SpeculationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--speculate") from None
    return draft


def check_local_budget(budget: str | None, found: list[str]) -> None:
    """--memory-budget sets a local cluster's budgets: refused (not ignored) when nodes were found,
    and checked before anything starts."""
    from edgeweave.runtime.memory_budget import parse_budget

    if budget is None:
        return
    if found:
        raise typer.BadParameter("applies only to the local cluster started when no node is found; nodes on the "
                                 "network take their own ([node] memory_budget)", param_hint="--memory-budget")
    try:
        parse_budget(budget)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--memory-budget") from None


def resolve_quantize(flag: str | None) -> str | None:
    """--quantize (or [coordinator] quantize, bound by edgeweave.cli_settings); BadParameter when unknown."""
    from edgeweave.config import ConfigError, pick_quantize

    try:
        return pick_quantize(flag, "")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--quantize") from None


def open_model(model: str | None) -> Any:
    """The checkpoint and its tokenizer, or BadParameter with the reason (a missing default model
    says how to install it)."""
    from edgeweave.splitting.tokenizer import Tokenizer, TokenizerError

    try:
        checkpoint = open_checkpoint(model)
        return checkpoint, Tokenizer.from_checkpoint(checkpoint)
    except (CheckpointError, TokenizerError) as exc:
        raise typer.BadParameter(str(exc), param_hint="MODEL") from None


def find_nodes_or_fail(peers: list[str] | None, interfaces: list[str] | None, discovery_timeout: float) -> list[Any]:
    """`node_selection.find_nodes`, with a bad or silent peer as a usage error naming it."""
    from edgeweave.coordinator.node_selection import NodeSelectionError, find_nodes

    try:
        return find_nodes(peers, interfaces, discovery_timeout)
    except NodeSelectionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--peer") from None


def discovered_plan_inputs(records: list[Any], given: list[float] | None, plan_id_for: Any, key_parts: tuple[str, str],
                           cache_dir: Path | None) -> tuple[list[float], list[int], str]:
    """Weights, announced memory budgets and where the weights came from, for discovered nodes:
    `--weights` if given, else exactly what `run` would pick (its cached plan over these nodes, or
    a fresh measurement stabilized like run's; read-only: plan changes no cache). Node ids and
    budgets come with the records (TXT or Info); the nodes are dialled only to be measured."""
    from edgeweave.coordinator import plan_cache
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.tp_driver import profile_weights, shard_cache_root

    budgets = [int(r.properties.get("budget") or 0) for r in records]
    if given:
        return given, budgets, "given"

    def measure() -> list[float]:
        clients = [NodeClient(r.address) for r in records]
        try:
            return profile_weights(clients)
        finally:
            for client in clients:
                client.close()

    ids = [r.node_id or r.address for r in records]
    root = Path(cache_dir) if cache_dir else shard_cache_root()
    weights, source = plan_cache.automatic_weights(root, plan_cache.plan_key(key_parts[0], key_parts[1], "float32", ids),
                                                   ids, measure, plan_id_for, update=False)
    return weights, budgets, source


def layouts_table(rows: list[dict], title: str) -> Table:
    """Which layout each kind of tensor gets in the shards, and its size (from `tensor_layouts`)."""
    table = Table(title=title)
    for column in ("tensor", "file type", "shard layout", "count", "MB"):
        table.add_column(column, justify="right" if column in ("count", "MB") else "left")
    for row in rows:
        table.add_row(row["tensor"], row["source"], row["layout"], str(row["count"]), f"{row['bytes'] / 1e6:.1f}")
    return table


def parse_weights(text: str | None, n_nodes: int | None = None) -> list[float] | None:
    """'2,1' -> [2.0, 1.0]; BadParameter with a sentence when malformed or of the wrong length."""
    if not text:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 2,1", param_hint="--weights") from None
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise typer.BadParameter(f"every weight must be a positive finite number, not {text!r}", param_hint="--weights")
    if n_nodes is not None and len(weights) != n_nodes:
        raise typer.BadParameter(f"{len(weights)} weights for {n_nodes} nodes", param_hint="--weights")
    return weights


def resolve_layout(text: str, weights: str | None = None, coordinator_share: float = 0.0) -> str | Layout:
    """--layout / [coordinator] layout, parsed (a bad one is a one-sentence usage error); `auto`
    refuses --weights and --coordinator-share, which the planner would not use."""
    try:
        request = parse_layout(text)
    except LayoutError as exc:
        raise typer.BadParameter(str(exc), param_hint="--layout") from None
    if request == "auto" and (weights or coordinator_share):
        raise typer.BadParameter("the planner measures the nodes itself: drop --weights and --coordinator-share, "
                                 "or name a layout", param_hint="--layout")
    return request


def planning_errors() -> tuple[type[Exception], ...]:
    """What `--layout auto` raises with one sentence: a node it cannot measure, or no layout that fits."""
    from edgeweave.coordinator.auto_layout import MeasureError, NothingFitsError

    return MeasureError, NothingFitsError


def plan_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    windowed = any("window" in row for row in rows)
    columns = ["node", "weight", "KV heads", "Q heads", "MLP columns", "MB"] + (["budget MB", "window"] if windowed else [])
    for column in columns:
        table.add_column(column, justify="right" if column != "node" else "left")
    for row in rows:
        cells = [row.get("address", f"rank {row['rank']}"), f"{row['weight']:g}",
                 f"{row['n_kv_heads']} {tuple(row['kv_heads'])}", str(row["n_q_heads"]),
                 f"{row['n_columns']} {tuple(row['columns'])}", f"{row['bytes'] / 1e6:.1f}"]
        if windowed:
            window = row.get("window")
            cells += [f"{row['memory_budget'] / 1e6:.0f}", "all resident" if window is None else f"{window} layers"]
        table.add_row(*cells)
    return table


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        model: str = typer.Argument(None, help=MODEL_HELP),
        nodes: int = typer.Option(None, "--nodes", "-n", help="Equal nodes to plan for when none is found (ignored with --weights)."),
        weights: str = typer.Option(None, help="Relative node capacities, e.g. 2,1 (default: measured on the nodes found)."),
        memory_budget: list[str] = typer.Option(
            None, help="Per-node memory budget (repeat once per node, e.g. 300MiB; default: what each node found "
                       "announces): plan sliding windows or refuse."
        ),
        context: int = typer.Option(None, help="Context length each node's KV cache must hold (default: the "
                                               "model's, at most 4096: what run, serve and the nodes plan for)."),
        quantize: str = typer.Option(None, help=QUANTIZE_HELP),
        peer: list[str] = typer.Option(None, metavar="HOST:PORT", help=PEER_HELP),
        interface: str = typer.Option(None, help=INTERFACE_HELP),
        discovery_timeout: float = typer.Option(None, help=DISCOVERY_HELP),
        cache_dir: Path = typer.Option(None, help="The coordinator's shard cache, whose remembered plans "
                                                  "`run` reuses (default ~/.cache/edgeweave/shards)."),
        prompt_tokens: int = typer.Option(128, help="Prompt length the first-token prediction (and the "
                                                     "decode step's KV cache) is measured for."),
        profile_seconds: float = typer.Option(1.0, help="Seconds each node may spend timing a layer of the "
                                                        "model (its link is timed in about half of that)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Show how the model's heads and MLP columns would be cut across the nodes on the network
        (or --nodes equal ones when none answers), and which nodes must stream their layers through
        a sliding window to stay within their memory budgets. With nodes, also what each of them
        measures for one layer and its link, and the predicted ms per token of every candidate
        layout (single node, tensor, pipeline, hybrid), marking the one run would choose."""
        from edgeweave.coordinator import cli_layouts
        from edgeweave.coordinator.recovery import UNLIMITED
        from edgeweave.runtime.memory_budget import fit_context, parse_budget
        from edgeweave.runtime.quantized import QuantizationError
        from edgeweave.splitting.memory_plan import MemoryPlanError, plan_memory
        from edgeweave.splitting.tensor_parallel import plan_shards, quantized_layouts, tensor_layouts

        precision = resolve_quantize(quantize)
        try:
            checkpoint = open_checkpoint(model)
        except CheckpointError as exc:
            raise typer.BadParameter(str(exc), param_hint="MODEL") from None
        if nodes < 1:
            raise typer.BadParameter("at least one node", param_hint="--nodes")
        if not 1 <= prompt_tokens <= 8192:
            raise typer.BadParameter("must be between 1 and 8192", param_hint="--prompt-tokens")
        if not 0.05 <= profile_seconds <= 30:
            raise typer.BadParameter("must be between 0.05 and 30 seconds", param_hint="--profile-seconds")
        records = find_nodes_or_fail(peer, [interface] if interface else None, discovery_timeout)
        given = parse_weights(weights, len(records) or None)
        announced: list[int] = []
        try:
            layouts = quantized_layouts(checkpoint, precision)

            def plan_for(node_weights: list[float]) -> Any:
                return plan_shards(checkpoint.config, node_weights, layouts, precision or "file")

            if records:
                node_weights, announced, origin = discovered_plan_inputs(
                    records, given, lambda w: plan_for(w).plan_id, (checkpoint.fingerprint, precision or "file"),
                    cache_dir)
                source = (f"planned for the {len(records)} node(s) found ({', '.join(r.address for r in records)}), "
                          f"weights {origin}, budgets as they announce them")
            else:
                node_weights = given or [1.0] * nodes
                source = f"no nodes found: planned for {len(node_weights)} {'weighted' if given else 'equal'} node(s)"
            plan_ = plan_for(node_weights)
            layout_rows = tensor_layouts(checkpoint, plan_)
        except (QuantizationError, CheckpointError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        rows = plan_.describe()
        for row, record in zip(rows, records, strict=False):
            row["address"] = record.address
        budgets: list[int] = []
        if memory_budget:
            if len(memory_budget) != len(rows):
                raise typer.BadParameter(f"give one budget per node ({len(rows)}), got {len(memory_budget)}",
                                         param_hint="--memory-budget")
            try:
                budgets = [parse_budget(b) for b in memory_budget]
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--memory-budget") from None
        elif any(announced):
            budgets = [b or UNLIMITED for b in announced]
        tensor_note = ""
        if budgets:
            try:
                fitted = plan_memory(plan_, budgets, coordinator_rank=None,
                                     context_length=fit_context(checkpoint.config.max_position_embeddings, context))
            except MemoryPlanError as exc:
                if not records:  # nothing else to show: the cut is the whole answer
                    typer.echo(f"error: the model does not fit: {exc}", err=True)
                    raise typer.Exit(2) from None
                tensor_note = f"this tensor-parallel cut does not fit: {exc}"
            else:
                for row, node in zip(rows, fitted.nodes, strict=True):
                    row["memory_budget"] = node.budget
                    row["window"] = node.window  # None = every layer resident
        report: dict[str, Any] = {"plan_id": plan_.plan_id, "model": str(checkpoint.path), "precision": plan_.precision,
                                  "source": source, "nodes": rows, "layouts": layout_rows}
        costs = layout_plan = None
        names = [r.address for r in records]
        if records:
            from edgeweave.coordinator.client import NodeError
            from edgeweave.coordinator.layout_choice import MeasureError, costs_to_dict

            try:
                costs, layout_plan = cli_layouts.measure_layouts(
                    names, checkpoint, precision, budgets or announced or None, context, prompt_tokens,
                    profile_seconds, given)
            except (NodeError, MeasureError) as exc:
                typer.echo(f"error: measuring the nodes for layout predictions failed: {exc}", err=True)
                raise typer.Exit(2) from None
            report.update(measured=costs_to_dict(costs), **layout_plan.to_dict(names))
            if tensor_note:
                report["tensor_note"] = tensor_note
        else:
            report["layout_note"] = cli_layouts.NEEDS_NODES
        if as_json:
            typer.echo(json.dumps(report, indent=1))
        else:
            console = Console()
            console.print(source, markup=False)
            if tensor_note:
                console.print(tensor_note, markup=False)
            console.print(plan_table(rows, f"{checkpoint.path.name}: {checkpoint.config.num_layers} layers"))
            console.print(layouts_table(layout_rows, f"shard layouts ({plan_.precision}; MLP cuts on "
                                                     f"{32 if layouts else 1}-column boundaries)"))
            if costs is None or layout_plan is None:
                console.print(cli_layouts.NEEDS_NODES, markup=False)
            else:
                console.print(cli_layouts.measured_table(costs))
                console.print(cli_layouts.hub_line(costs), markup=False)
                console.print(cli_layouts.candidates_table(layout_plan, names))
                if layout_plan.choice is None:
                    console.print("no layout fits these nodes' memory budgets", markup=False)

    @app.command("run")
    def run(
        ctx: typer.Context,
        model: str = typer.Argument(None, help=MODEL_HELP),
        prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt (a user message with --chat)."),
        nodes: int = typer.Option(None, "--nodes", "-n", help="Nodes of the local cluster started when none is found."),
        peer: list[str] = typer.Option(None, metavar="HOST:PORT", help=PEER_HELP),
        interface: str = typer.Option(None, help=INTERFACE_HELP),
        discovery_timeout: float = typer.Option(None, help=DISCOVERY_HELP),
        weights: str = typer.Option(None, help="Relative node capacities, e.g. 2,1 (default: measured GFLOP/s)."),
        max_tokens: int = typer.Option(64, help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
        top_k: int = typer.Option(0, help="Keep the k most likely tokens (0 = all)."),
        seed: int = typer.Option(None, help="Random seed for sampling."),
        chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
        dtype: str = typer.Option("float32", help="Shard dtype on disk and on the wire to nodes: float32, float16, bfloat16."),
        quantize: str = typer.Option(None, help=QUANTIZE_HELP),
        cache_dir: Path = typer.Option(None, help="Where this coordinator keeps written shards (default "
                                                  "~/.cache/edgeweave/shards, or $EDGEWEAVE_CACHE/shards)."),
        memory_budget: str = typer.Option(None, help=LOCAL_BUDGET_HELP),
        layout: str = typer.Option(None, help=LAYOUT_HELP),
        coordinator_share: float = typer.Option(
            0.0, help="Let this device compute a share too, with this weight (0 = off; with --weights, "
                      "relative to them). Saves a message per allreduce, as TPI-LLM's master does."),
        speculate: int = typer.Option(None, metavar="K", help=SPECULATE_HELP),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming."),
    ) -> None:
        """Generate text with the model split across nodes (tensor parallel, pipeline or hybrid: --layout)."""
        from edgeweave.coordinator.client import NodeClient
        from edgeweave.coordinator.local_cluster import LocalCluster
        from edgeweave.coordinator.tp_driver import DistributedLlama
        from edgeweave.runtime.quantized import QuantizationError
        from edgeweave.runtime.sampling import SamplingParams

        precision = resolve_quantize(quantize)
        layout_request = resolve_layout(layout, weights, coordinator_share)
        draft = resolve_speculate(speculate, temperature, explicit=from_command_line(ctx, "speculate"))
        if coordinator_share < 0:
            raise typer.BadParameter("must be >= 0", param_hint="--coordinator-share")
        if max_tokens < 1:
            raise typer.BadParameter("must be at least 1", param_hint="--max-tokens")
        # cheap checks first: a silent peer is named before a 100 MB model file is parsed
        records = find_nodes_or_fail(peer, [interface] if interface else None, discovery_timeout)
        node_weights = parse_weights(weights, len(records) or nodes)
        checkpoint, tokenizer = open_model(model)
        try:
            sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                      stop_token_ids=frozenset(checkpoint.config.eos_token_ids))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
        if not prompt_ids:
            raise typer.BadParameter("the prompt is empty: give some text to continue", param_hint="--prompt")
        log.info("model %s: %d layers, %d prompt tokens", checkpoint.path, checkpoint.config.num_layers, len(prompt_ids))
        with contextlib.ExitStack() as stack:
            addresses = [r.address for r in records]
            check_local_budget(memory_budget, addresses)
            if not addresses:
                log.info("no nodes found; starting a local cluster of %d node(s)", nodes)
                cluster = stack.enter_context(LocalCluster(nodes, interface=interface or "127.0.0.1", advertise=False,
                                                           memory_budgets=[memory_budget] * nodes if memory_budget else None))
                addresses = list(cluster.addresses)
            clients = [stack.enter_context(NodeClient(a)) for a in addresses]
            members, member_weights = clients, node_weights
            if coordinator_share > 0:
                from edgeweave.coordinator.local_member import LocalMember

                members = [stack.enter_context(LocalMember()), *clients]
                member_weights = [coordinator_share, *(member_weights or [1.0] * len(clients))]
            # speculation needs token-invariant nodes (its tokens are then exactly greedy decoding's on
            # them); plain decoding keeps the one-row kernels (float ones are ~2x faster per token)
            options = dict(dtype=dtype, show_progress=not as_json, quantize=precision, cache_dir=cache_dir,
                           token_invariant=draft > 0)
            refusals: tuple[type[Exception], ...] = (QuantizationError, LayoutError)
            try:
                if layout_request == "auto":
                    from edgeweave.coordinator.auto_layout import open_auto

                    refusals += planning_errors()
                    llm = stack.enter_context(open_auto(checkpoint, members, prompt_tokens=len(prompt_ids), **options))
                else:
                    llm = stack.enter_context(DistributedLlama(checkpoint, members, member_weights,
                                                               layout=layout_request, **options))
            except refusals as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            decoder = tokenizer.stream_decoder()
            tokens: list[int] = []
            if draft:
                from edgeweave.coordinator import speculative

                stream = speculative.generate(llm, prompt_ids, max_tokens, draft, sampling)
            else:
                stream = llm.generate(prompt_ids, max_tokens, sampling)
            for token in stream:
                if not tokens:
                    log.info("first token after %.0f ms", llm.last_stats.ttft_s * 1e3)
                tokens.append(token)
                piece = decoder.feed(token)
                if piece and not as_json:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            stats = llm.last_stats
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if as_json:
                typer.echo(json.dumps({
                    "text": text, "tokens": tokens, "ttft_s": stats.ttft_s, "per_token_s": stats.per_token_s,
                    "comm_s": stats.comm_s, "nodes": llm.describe(), "shard_bytes_sent": llm.bytes_sent,
                    "shard_bytes_written": llm.bytes_written, "weights_source": llm.weights_source,
                    "layout": llm.layout.describe(), "stages": llm.layout.to_dict(),
                    "messages_per_token": llm.messages_per_token, "replans": llm.replans,
                    "predicted": llm.planned.to_dict() if llm.planned is not None else None,
                    "speculate": draft, "passes": stats.passes, "drafted": stats.drafted, "accepted": stats.accepted,
                    "tokens_per_pass": stats.tokens_per_pass,
                }))
                return
            sys.stdout.write(decoder.flush() + "\n")
            per_token = f"{stats.per_token_s * 1e3:.1f} ms" if stats.per_token_s else "n/a"
            typer.echo(f"{len(tokens)} tokens on {len(members)} members: first token {stats.ttft_s * 1e3:.0f} ms, "
                       f"then {per_token} per token (median); {stats.comm_s:.2f} s waiting on the network", err=True)
            if stats.passes:
                typer.echo(f"speculation: {stats.passes} passes, {stats.tokens_per_pass:.2f} tokens per pass, "
                           f"{stats.accepted} of {stats.drafted} drafted tokens accepted", err=True)
