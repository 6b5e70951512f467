"""`edgeweave demo`: a guided tour on one machine, as a list of named steps others can append to.

Each step is `fn(ctx: DemoContext) -> None`; append with `add_step(name, fn)` from your module.
The cluster is stopped whatever happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import typer
from rich.console import Console

from edgeweave.coordinator.cli_cluster import health_rtt_ms, nodes_table
from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.discovery import NodeRecord, discover
from edgeweave.coordinator.local_cluster import LocalCluster


@dataclass
class DemoContext:
    console: Console
    n_nodes: int = 3
    cluster: LocalCluster | None = None
    records: list[NodeRecord] = field(default_factory=list)
    #: free-form results steps leave for later steps
    results: dict[str, Any] = field(default_factory=dict)


def step_start_cluster(ctx: DemoContext) -> None:
    ctx.cluster = LocalCluster(ctx.n_nodes).start()
    for name, address in zip(ctx.cluster.names, ctx.cluster.addresses, strict=True):
        ctx.console.print(f"  {name} serving on {address}")


def step_discover(ctx: DemoContext) -> None:
    assert ctx.cluster is not None
    wanted = set(ctx.cluster.names)
    found = discover(timeout=5.0, interfaces=["127.0.0.1"], wait_for=ctx.n_nodes)
    ctx.records = [r for r in found if r.name in wanted]
    if len(ctx.records) < ctx.n_nodes:  # mDNS may be slower than usual on a busy machine: ask directly
        seen = {r.name for r in ctx.records}
        ctx.records += discover(timeout=0, peers=[a for n, a in zip(ctx.cluster.names, ctx.cluster.addresses, strict=True) if n not in seen])
    ctx.console.print(nodes_table(ctx.records, [health_rtt_ms(r.address) for r in ctx.records]))


def step_echo_tensor(ctx: DemoContext) -> None:
    x = torch.randn(4, 576)
    for record in ctx.records:
        with NodeClient(record.address) as client:
            client.load("demo-echo", "echo", {}, {})
            with client.open_stream(reply_timeout=10) as stream:
                start = time.perf_counter()
                (y,), _ = stream.call("demo-echo", "echo", [x])
                rtt_ms = (time.perf_counter() - start) * 1e3
            client.unload("demo-echo")
        same = torch.equal(x, y)
        ctx.console.print(f"  {record.name}: tensor {tuple(x.shape)} round trip {'bit-exact' if same else 'MISMATCH'} in {rtt_ms:.2f} ms")
        if not same:
            raise RuntimeError(f"node {record.name} returned a different tensor")


#: a question SmolLM2 answers the same way at every precision and cut: the bare "What is the capital of
#: France?" is a near-tie at its first token (float32 says "The", Q4_1 here and llama.cpp "L'Étoile")
DEMO_QUESTION = "What is the capital of France? Answer in one sentence."


def step_tensor_parallel_llm(ctx: DemoContext) -> None:
    """SmolLM2 split by attention heads and MLP columns over every node, answering a question."""
    from edgeweave.coordinator.cli_llm import plan_table
    from edgeweave.coordinator.tp_driver import DistributedLlama
    from edgeweave.runtime.sampling import SamplingParams
    from edgeweave.splitting.checkpoints import open_checkpoint
    from edgeweave.splitting.tokenizer import Tokenizer

    assert ctx.cluster is not None
    checkpoint = open_checkpoint(None)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": DEMO_QUESTION}])
    sampling = SamplingParams(stop_token_ids=frozenset(checkpoint.config.eos_token_ids))
    clients = [NodeClient(a) for a in ctx.cluster.addresses]
    try:
        with DistributedLlama(checkpoint, clients, [1.0] * len(clients), show_progress=True) as llm:
            ctx.console.print(plan_table(llm.describe(), "who computes what (per layer)"))
            ctx.console.print(f"  [bold]user:[/bold] {DEMO_QUESTION}")
            decoder = tokenizer.stream_decoder()
            ctx.console.print("  [bold]assistant:[/bold] ", end="")
            tokens = []
            for token in llm.generate(prompt_ids, 48, sampling):
                tokens.append(token)
                ctx.console.print(decoder.feed(token), end="", markup=False, highlight=False)
            ctx.console.print(decoder.flush(), markup=False, highlight=False)
            stats = llm.last_stats
    finally:
        for client in clients:
            client.close()
    per_token = f"{stats.per_token_s * 1e3:.1f} ms" if stats.per_token_s else "n/a"
    ctx.console.print(
        f"  {len(tokens)} tokens across {len(clients)} nodes: first token after {stats.ttft_s * 1e3:.0f} ms, "
        f"then {per_token} per token (median), {stats.comm_s / max(len(tokens), 1) * 1e3:.1f} ms of it on the network"
    )
    ctx.results["llm_answer"] = tokenizer.decode(tokens, skip_special_tokens=True)


def step_split_computing(ctx: DemoContext) -> None:
    """A digit classified with the head (and its learned bottleneck) on one node, the tail on another."""
    from edgeweave.coordinator.split_driver import split_demo_step

    assert ctx.cluster is not None
    ctx.console.print(f"  {split_demo_step(list(ctx.cluster.addresses[:2]))}")


DEMO_STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("start a local 3-node cluster", step_start_cluster),
    ("discover it with mDNS on 127.0.0.1", step_discover),
    ("round-trip a tensor through every node", step_echo_tensor),
    ("tensor-parallel SmolLM2 across the nodes (TPI-LLM style)", step_tensor_parallel_llm),
    ("split computing with a learned bottleneck (BottleFit style)", step_split_computing),
]


def add_step(name: str, fn: Callable[[DemoContext], None]) -> None:
    """Append a step to `edgeweave demo` (it runs after the cluster is up and discovered)."""
    DEMO_STEPS.append((name, fn))


def run_demo(ctx: DemoContext) -> None:
    try:
        for i, (name, fn) in enumerate(DEMO_STEPS, 1):
            ctx.console.rule(f"step {i}: {name}")
            start = time.perf_counter()
            fn(ctx)
            ctx.console.print(f"  done in {time.perf_counter() - start:.1f} s")
    finally:
        if ctx.cluster:
            ctx.cluster.stop()
            ctx.console.print("cluster stopped")


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(nodes: int = typer.Option(3, help="Number of local nodes.")) -> None:
        """Start a local cluster, discover it, run every demo step, stop it."""
        if nodes < 2:
            raise typer.BadParameter("the demo splits work between nodes: give at least 2", param_hint="--nodes")
        check_demo_assets()
        run_demo(DemoContext(console=Console(), n_nodes=nodes))


def check_demo_assets() -> None:
    """Exit with the install command, before anything starts, when the default model or the
    demo's digits are missing (a pip-installed edgeweave has neither until asked)."""
    from edgeweave.splitting.checkpoints import CheckpointError, default_model_path
    from edgeweave.splitting.datasets import DatasetUnavailableError, check_available
    from edgeweave.splitting.split_artifacts import DEMO_SETTINGS

    try:
        default_model_path()
        check_available(DEMO_SETTINGS.dataset)
    except (CheckpointError, DatasetUnavailableError) as exc:
        typer.echo(f"error: the demo needs files that are not installed: {exc}", err=True)
        raise typer.Exit(2) from None
