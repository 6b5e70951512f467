"""`edgeweave plan`'s layout section: the measured costs per node and each candidate layout's prediction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from edgeweave.splitting.layout_planner import ClusterCosts, LayoutPlan

#: what plan says instead of predictions when it found no node to measure
NEEDS_NODES = ("layout predictions (single, tensor, pipeline, hybrid) need nodes to measure: start nodes "
               "(edgeweave node) or name them with --peer")


def measure_layouts(addresses: Sequence[str], checkpoint: Any, precision: str | None, budgets: Sequence[int] | None,
                    context: int | None, prompt_tokens: int, seconds: float,
                    capacities: Sequence[float] | None) -> tuple[ClusterCosts, LayoutPlan]:
    """Measure the nodes at `addresses` and plan their layouts (`coordinator.layout_choice`)."""
    from edgeweave.coordinator.client import NodeClient
    from edgeweave.coordinator.layout_choice import measure_cluster, plan_cluster

    clients = [NodeClient(a) for a in addresses]
    try:
        costs = measure_cluster(clients, checkpoint, precision, prompt_tokens=prompt_tokens, budgets=budgets,
                                context=context, budget_s=seconds)
    finally:
        for client in clients:
            client.close()
    return costs, plan_cluster(costs, capacities)


def _mb(n: float) -> str:
    return "unlimited" if n <= 0 or n >= 1 << 60 else f"{n / 1e6:.0f}"


def measured_table(costs: ClusterCosts) -> Table:
    p = costs.prompt_tokens
    table = Table(title=f"measured per node (one layer of this model; prefill = {p} tokens)")
    for column in ("node", "layer decode ms", f"layer prefill ms ({p} tok)", "attn|mlp ms (smallest shard)",
                   "all at once", "RTT ms", "link MB/s", "disk MB/s", "budget MB", "transport"):
        table.add_column(column, justify="left" if column in ("node", "transport") else "right")
    for n in costs.nodes:
        ops = (f"{n.attn_decode_s * 1e3:.3f}|{n.mlp_decode_s * 1e3:.3f} "
               f"({n.shard_attn_decode_s * 1e3:.3f}|{n.shard_mlp_decode_s * 1e3:.3f})")
        table.add_row(n.name, f"{n.layer_decode_s * 1e3:.3f}", f"{n.layer_prefill_s * 1e3:.1f}", ops,
                      f"{n.concurrent_slowdown:.2f}x", f"{n.rtt_s * 1e3:.3f}", f"{n.bandwidth_Bps / 1e6:.0f}",
                      f"{n.disk_read_Bps / 1e6:.0f}", _mb(n.memory_budget), n.transport)
    return table


def hub_line(costs: ClusterCosts) -> str:
    hub = costs.hub
    line = (f"coordinator: {hub.message_s * 1e3:.3f} ms per extra message, {hub.reduction_s * 1e3:.3f} ms norm+residual "
            f"per reduction, {hub.token_s * 1e3:.2f} ms embedding+LM head per token")
    extras = list(costs.reduction_extra_s.values())
    if extras:
        line += (f"; a decode reduction measured {min(extras) * 1e3:.2f}-{max(extras) * 1e3:.2f} ms beyond its slowest "
                 f"rank's round trip and compute ({len(extras)} node sets and ops)")
    return line


def candidates_table(plan: LayoutPlan, names: Sequence[str]) -> Table:
    table = Table(title="candidate layouts (predicted; * = the choice: fastest decode that fits, ties to the simpler)")
    for column in ("", "layout", "nodes", "weights", "ms/token", "first token ms", "fits"):
        table.add_column(column, justify="right" if "ms" in column else "left")
    for c in plan.candidates:
        if c.fits:
            windowed = [f"{names[c.nodes[r]]}: window {w}" for r, w in enumerate(c.windows) if w is not None]
            fits = "yes" + (f" ({'; '.join(windowed)})" if windowed else "")
        else:
            fits = f"no: {c.reason}"
        table.add_row("*" if c is plan.choice else "", c.describe(), ", ".join(names[i] for i in c.nodes),
                      ",".join(f"{w:.3g}" for w in c.weights), _ms(c.decode_s, 2), _ms(c.first_token_s, 1), fits)
    return table


def _ms(seconds: float, digits: int) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.{digits}f}"
