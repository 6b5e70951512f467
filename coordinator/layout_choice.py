"""Measure a cluster for the layout planner and choose its layout: what `edgeweave plan` shows,
and what `run`/`serve` call, so they use exactly the prediction plan printed.

    costs = measure_cluster(clients, checkpoint, quantize, prompt_tokens=128)
    choice = choose_layout(costs)          # a splitting.layout_planner.Candidate, or None
    choice.layout, choice.nodes, choice.weights  -> what the driver executes

Per node: its Profile RPC times one layer of the model's shape in the layouts this plan ships
(runtime/layer_profile.py), and `link_probe.probe_link` times its Forward stream. Nodes are
measured one at a time, so co-located nodes do not slow each other's figures; then, with more
than one node, every node times its layer again at the same moment (`concurrent_slowdowns`): what
a node's compute is worth while the others compute too, as they do in every tensor-parallel
reduction (separate devices measure about 1; emulated devices sharing a host's cores and memory
bus measure more, and a planner blind to it under-predicts tensor layouts there). Here: the hub's
own work (runtime/hub_profile.py) and its cost per further message of a reduction: its own
Python (`link_probe.message_cost_s`), or more where an echo to every node at once
(`link_probe.probe_fanout`) shows that a further message really costs more (nodes sharing the
coordinator's cores).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from edgeweave.coordinator.client import NodeClient
from edgeweave.coordinator.link_probe import EchoReductions, message_cost_s, probe_fanout, probe_link
from edgeweave.coordinator.plan_cache import grid_weights
from edgeweave.proto import pb
from edgeweave.runtime.hub_profile import profile_hub
from edgeweave.runtime.layer_compute import BACKENDS
from edgeweave.runtime.layer_profile import DEFAULT_PROMPT_TOKENS, ProjectionLayout
from edgeweave.runtime.memory_budget import fit_context
from edgeweave.splitting.checkpoints import Checkpoint
from edgeweave.splitting.layout_planner import (
    Candidate,
    ClusterCosts,
    HubCosts,
    LayoutPlan,
    NodeCosts,
    plan_layouts,
    profile_shares,
    reduction_probes,
)
from edgeweave.splitting.llama_config import LlamaConfig
from edgeweave.splitting.quant_plan import TensorLayout
from edgeweave.splitting.tensor_parallel import hub_layouts, plan_shards, quantized_layouts

log = logging.getLogger(__name__)


class MeasureError(RuntimeError):
    """A node could not be measured for layout planning; the text names it and says why."""


def layer_shape_message(config: LlamaConfig, layouts: Mapping[str, TensorLayout] | None,
                        float_dtype: str = "float32") -> pb.LayerShape:
    """The Profile request's layer: the model's dimensions and each projection's layout as shipped."""
    projections = [pb.ProjectionLayout(kind=kind, bits=layout.bits or 0, block=layout.block or 0, offset=layout.offset)
                   for kind, layout in sorted((layouts or {}).items()) if layout.quantized]
    return pb.LayerShape(hidden=config.hidden_size, intermediate=config.intermediate_size, n_q_heads=config.num_heads,
                         n_kv_heads=config.num_kv_heads, head_dim=config.head_dim, projections=projections,
                         attention_bias=config.attention_bias, qk_norm=config.qk_norm, float_dtype=float_dtype)


def head_layout(checkpoint: Checkpoint, layouts: Mapping[str, TensorLayout] | None, precision: str,
                dtype: str = "float32") -> ProjectionLayout | None:
    """How the hub holds the LM head for this plan (None: float), from `tensor_parallel.hub_layouts`."""
    plan = plan_shards(checkpoint.config, [1.0], dict(layouts) if layouts else None, precision)
    found = hub_layouts(checkpoint, plan, dtype)
    layout = found.get("lm_head.weight") or found["model.embed_tokens.weight"]
    return ProjectionLayout(layout.bits, layout.block or 32, layout.offset) if layout.quantized else None


def measure_node(client: NodeClient, shape: pb.LayerShape, hidden: int, *, backend: str, prompt_tokens: int,
                 budget: int | None, budget_s: float, shards: Sequence[tuple[int, int]] = ()) -> NodeCosts:
    """One node's NodeCosts: its layer timing (and its ops on `shards`: (KV heads, MLP columns)),
    disk speed and budget (announced unless given), and its link."""
    reply = client.profile(budget_s=budget_s, layer=shape, backend=backend, prompt_tokens=prompt_tokens,
                           shards=shards)
    if reply.layer_decode_s <= 0 or reply.layer_prefill_s <= 0:
        raise MeasureError(f"node {client.address} did not time a layer (an edgeweave node older than layer "
                           "profiles?); upgrade it to plan layouts over it")
    if len(reply.shard_timings) != len(shards):
        raise MeasureError(f"node {client.address} timed {len(reply.shard_timings)} of the {len(shards)} shards "
                           "asked (an edgeweave node older than shard profiles?); upgrade it to plan layouts over it")
    link = probe_link(client, hidden, budget_s=budget_s / 2)
    if budget is None:
        budget = client.info().resources.memory_budget
    return NodeCosts(client.address, reply.layer_decode_s, reply.layer_prefill_s, int(budget), link.rtt_s,
                     link.bandwidth_Bps, max(reply.disk_read_mbps, 1e-3) * (1 << 20), backend,
                     attn_decode_s=reply.layer_attn_decode_s, mlp_decode_s=reply.layer_mlp_decode_s,
                     shard_attn_decode_s=reply.shard_attn_decode_s, shard_mlp_decode_s=reply.shard_mlp_decode_s,
                     shard_mlp_columns=reply.shard_mlp_columns or 32, layer_file_bytes=reply.layer_file_bytes,
                     transport=link.transport,
                     attn_shares_s=tuple((t.n_kv_heads / shape.n_kv_heads, t.attn_decode_s)
                                         for t in reply.shard_timings if t.n_kv_heads),
                     mlp_shares_s=tuple((t.mlp_columns / shape.intermediate, t.mlp_decode_s)
                                        for t in reply.shard_timings if t.mlp_columns))


#: the reductions' timing: passes over every probe (at least MIN, at most MAX, more while
#: REDUCTIONS_BUDGET x budget_s lasts), REDUCTIONS_PER_PASS reductions of each probe per pass
MIN_PASSES, MAX_PASSES, REDUCTIONS_PER_PASS, REDUCTIONS_BUDGET = 3, 20, 3, 1.5
#: a concurrent timing is taken as at most this many times the node's own (a stall, not sharing)
MAX_SLOWDOWN = 4.0


def concurrent_slowdowns(clients: Sequence[NodeClient], shape: pb.LayerShape, alone: Sequence[NodeCosts], *,
                         backend: str, prompt_tokens: int, budget_s: float) -> list[float]:
    """Per node: its layer decode time while every node times its own at the same moment, over its
    time alone (`alone`), within [1, MAX_SLOWDOWN]."""
    def timed(client: NodeClient) -> float:
        reply = client.profile(budget_s=budget_s, layer=shape, backend=backend, prompt_tokens=prompt_tokens)
        return reply.layer_decode_s

    with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="concurrent-profile") as pool:
        together = list(pool.map(timed, clients))  # a node failing here fails as in its own timing
    slowdowns = [min(max(t / n.layer_decode_s, 1.0), MAX_SLOWDOWN) for t, n in zip(together, alone, strict=True)]
    log.info("layer decode while all %d nodes compute at once, over alone: %s", len(clients),
             ", ".join(f"{k:.2f}x" for k in slowdowns))
    return slowdowns


def measure_cluster(
    clients: Sequence[NodeClient], checkpoint: Checkpoint, quantize: str | None = None, *, backend: str = BACKENDS[0],
    dtype: str = "float32", prompt_tokens: int = DEFAULT_PROMPT_TOKENS, budgets: Sequence[int] | None = None,
    context: int | None = None, budget_s: float = 1.0,
) -> ClusterCosts:
    """Everything `splitting.layout_planner` needs for these nodes and this model, measured now
    (about 1.5 x `budget_s` per node, a few tenths of a second more per shard share it times,
    plus about 2.5 x `budget_s` here). `quantize` and `dtype` as the driver's
    (the shards' layouts); `budgets` override what the nodes announce (0 = unlimited)."""
    config = checkpoint.config
    layouts = quantized_layouts(checkpoint, quantize, dtype)
    shape = layer_shape_message(config, layouts, dtype)
    if budgets is not None and len(budgets) != len(clients):
        raise ValueError(f"{len(budgets)} memory budgets for {len(clients)} nodes")
    shards = profile_shares(config, layouts, len(clients))
    nodes = tuple(measure_node(client, shape, config.hidden_size, backend=backend, prompt_tokens=prompt_tokens,
                               budget=None if budgets is None else budgets[i], budget_s=budget_s, shards=shards)
                  for i, client in enumerate(clients))
    if len(clients) > 1:
        slowdowns = concurrent_slowdowns(clients, shape, nodes, backend=backend, prompt_tokens=prompt_tokens,
                                         budget_s=budget_s)
        nodes = tuple(replace(n, concurrent_slowdown=k) for n, k in zip(nodes, slowdowns, strict=True))
    head = head_layout(checkpoint, layouts, quantize or "file", dtype)
    hub = profile_hub(config.hidden_size, config.vocab_size, head, prompt_tokens, config.rms_norm_eps, budget_s / 2)
    threads = 1 if head is not None else None  # the hub's torch threads beside a quantized head
    message = message_cost_s(config.hidden_size, 1, 0.1, threads)
    message_prefill = message_cost_s(config.hidden_size, prompt_tokens, 0.1, threads)
    if len(clients) > 1:  # what a further message costs in situ (shared cores included), if more
        fanout = probe_fanout(clients, config.hidden_size, budget_s=budget_s / 2)
        extra = max(0.0, (fanout - max(n.rtt_s for n in nodes)) / (len(clients) - 1) - message)
        log.info("fan-out echo over %d nodes: %.3f ms; %.3f ms per further message beyond the coordinator's "
                 "own %.3f ms", len(clients), fanout * 1e3, extra * 1e3, message * 1e3)
        message, message_prefill = message + extra, message_prefill + extra
    costs = HubCosts(message, message_prefill, hub.reduction_s, hub.reduction_prefill_s, hub.token_s, hub.prefill_s)
    measured = ClusterCosts(config, layouts, nodes, costs, prompt_tokens,
                            fit_context(config.max_position_embeddings, context)).check()
    if len(clients) < 2:
        return measured
    return replace(measured, reduction_extra_s=measure_reductions(clients, measured, budget_s=budget_s))


def measure_reductions(clients: Sequence[NodeClient], costs: ClusterCosts, *,
                       budget_s: float) -> dict[tuple[tuple[str, ...], str], float]:
    """X_R,op of `splitting.layout_planner` for every decode reduction a candidate would run: each
    timed as the hub runs it, every rank busy at once for the compute the model gives it (the echo
    executor's op "work"), less the model's slowest rank (never below 0). With the default rank
    weights (`plan_cluster`'s); other `--weights` cut about the same shares."""
    probes = reduction_probes(costs, grid_weights([n.speed for n in costs.nodes]))
    if not probes:
        return {}
    samples: dict[tuple[tuple[str, ...], str], list[float]] = {probe.key: [] for probe in probes}
    with EchoReductions(clients, costs.config.hidden_size, reply_timeout=max(10.0, 4 * budget_s)) as echoes:
        for probe in probes:
            echoes.time_s(probe.nodes, probe.computes_s, 2)  # warm
        # passes over every probe in turn, so that the host's drift (the same setting's messages cost
        # up to 1.5x more ten minutes later on the 2-core bed) weighs on every reduction alike
        deadline, passes = time.perf_counter() + REDUCTIONS_BUDGET * budget_s, 0
        while passes < MIN_PASSES or (passes < MAX_PASSES and time.perf_counter() < deadline):
            for probe in probes:
                samples[probe.key] += echoes.time_s(probe.nodes, probe.computes_s, REDUCTIONS_PER_PASS)
            passes += 1
    extra = {probe.key: max(0.0, statistics.median(samples[probe.key]) - probe.slowest_s) for probe in probes}
    log.info("decode reductions beyond their slowest rank's round trip and compute: %s",
             ", ".join(f"{'+'.join(names)} {op} {x * 1e3:.2f} ms" for (names, op), x in extra.items()))
    return extra


def plan_cluster(costs: ClusterCosts, capacities: Sequence[float] | None = None) -> LayoutPlan:
    """Every candidate and the choice. Without `capacities` the rank weights are the measured
    speeds snapped to `plan_cache.grid_weights` (near-equal nodes get equal shares, so the same
    cluster keeps its cut and its shards run after run)."""
    weights = list(capacities) if capacities is not None else grid_weights([n.speed for n in costs.nodes])
    return plan_layouts(costs, weights)


def choose_layout(costs: ClusterCosts, capacities: Sequence[float] | None = None) -> Candidate | None:
    """The layout to run (None: nothing fits); the same as `edgeweave plan` marks."""
    return plan_cluster(costs, capacities).choice


def costs_to_dict(costs: ClusterCosts) -> dict[str, Any]:
    """The measured numbers, in ms, MB and MB/s, as `edgeweave plan --json` shows them."""
    hub = costs.hub
    return {
        "prompt_tokens": costs.prompt_tokens, "context": costs.context,
        "nodes": [{
            "address": n.name, "layer_decode_ms": n.layer_decode_s * 1e3, "layer_prefill_ms": n.layer_prefill_s * 1e3,
            "attn_decode_ms": n.attn_decode_s * 1e3, "mlp_decode_ms": n.mlp_decode_s * 1e3,
            "shard_attn_decode_ms": n.shard_attn_decode_s * 1e3, "shard_mlp_decode_ms": n.shard_mlp_decode_s * 1e3,
            "attn_shares_ms": [[share, t * 1e3] for share, t in n.attn_shares_s],
            "mlp_shares_ms": [[share, t * 1e3] for share, t in n.mlp_shares_s],
            "layer_file_bytes": n.layer_file_bytes, "rtt_ms": n.rtt_s * 1e3, "bandwidth_MBps": n.bandwidth_Bps / 1e6,
            "disk_MBps": n.disk_read_Bps / 1e6, "memory_budget": n.memory_budget, "transport": n.transport,
            "concurrent_slowdown": n.concurrent_slowdown,
            "kernel": n.kernel if costs.layouts is not None else "float",
        } for n in costs.nodes],
        "coordinator": {"message_ms": hub.message_s * 1e3, "message_prefill_ms": hub.message_prefill_s * 1e3,
                        "reduction_ms": hub.reduction_s * 1e3, "reduction_prefill_ms": hub.reduction_prefill_s * 1e3,
                        "head_ms": hub.token_s * 1e3, "head_prefill_ms": hub.prefill_s * 1e3},
        "reductions": [{"nodes": list(names), "op": op, "extra_ms": x * 1e3}
                       for (names, op), x in costs.reduction_extra_s.items()],
    }
