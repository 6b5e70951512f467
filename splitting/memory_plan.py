"""Will a plan fit the cluster's memory? Per node: all resident, a window, or a refusal.

Each node holds its shard of each of its layers (every layer in tensor parallelism, a range of
whole layers in a pipeline stage); its budget pays for its KV cache (its KV heads only,
times the context), a fixed runtime overhead, and on the node that hosts the coordinator the
hub's tensors (embedding, norms, LM head). What is left holds layers, through the sliding-window
scheduler when not all of them fit (`runtime.memory_budget.choose_window` has the rule).
When some node cannot hold even one of its layers, `fit_cluster` refuses with one sentence that
names every short node and how much it lacks. No networking here: budgets come in as numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeweave.runtime.memory_budget import (
    NODE_OVERHEAD_BYTES,
    MemoryBudgetError,
    choose_window,
    format_bytes,
    held_layer_bytes,
    kv_cache_bytes,
    max_window_bytes,
    resident_layers,
)
from edgeweave.splitting.tensor_parallel import TensorParallelPlan

#: the node's runtime overhead, as the node itself counts it (`runtime.memory_budget`)
DEFAULT_NODE_OVERHEAD = NODE_OVERHEAD_BYTES


class MemoryPlanError(MemoryBudgetError):
    """The cluster cannot run the plan; the message names each short node and the bytes it lacks."""


@dataclass(frozen=True)
class NodeMemory:
    """One node's memory decision."""

    name: str
    budget: int
    layer_bytes: tuple[int, ...]
    kv_cache_bytes: int
    fixed_bytes: int  # runtime overhead + coordinator tensors held here
    window: int | None  # None = all layers resident

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes)

    @property
    def for_weights(self) -> int:
        return self.budget - self.kv_cache_bytes - self.fixed_bytes

    @property
    def resident_weight_bytes(self) -> int:
        """Most layer bytes the node holds at once."""
        return self.weight_bytes if self.window is None else max_window_bytes(self.layer_bytes, self.window)


@dataclass(frozen=True)
class MemoryPlan:
    nodes: tuple[NodeMemory, ...]

    @property
    def windows(self) -> list[int | None]:
        """Per-node `window` for the executor config (None = all resident)."""
        return [n.window for n in self.nodes]


def fit_cluster(
    names: Sequence[str],
    budgets: Sequence[int],
    layer_bytes: Sequence[Sequence[int]],
    kv_bytes: Sequence[int],
    fixed_bytes: Sequence[int],
    windowed_bytes: Sequence[Sequence[int]] | None = None,
) -> MemoryPlan:
    """Per-node windows for per-node budgets, layer sizes, KV caches and fixed costs, or MemoryPlanError.

    `layer_bytes` is what each layer costs resident, `windowed_bytes` (default the same) what it costs
    in a window (`runtime.memory_budget.held_layer_bytes`)."""
    if not len(names) == len(budgets) == len(layer_bytes) == len(kv_bytes) == len(fixed_bytes):
        raise ValueError("fit_cluster needs one name, budget, layer list, KV size and fixed size per node")
    decided: list[NodeMemory] = []
    short: list[tuple[str, int, int, int, int, int]] = []  # name, budget, kv, fixed, for weights, missing
    windowed_all = windowed_bytes if windowed_bytes is not None else layer_bytes
    for name, budget, layers, windowed, kv, fixed in zip(names, budgets, layer_bytes, windowed_all, kv_bytes,
                                                         fixed_bytes, strict=True):
        layers = tuple(int(b) for b in layers)
        try:
            window = choose_window(layers, int(budget), int(kv), int(fixed), windowed_bytes=windowed)
        except MemoryBudgetError:
            for_weights = int(budget) - int(kv) - int(fixed)
            short.append((name, int(budget), int(kv), int(fixed), for_weights, max(windowed) - for_weights))
            continue
        decided.append(NodeMemory(name, int(budget), layers, int(kv), int(fixed), window))
    if short:
        per_token = sum(sum(layers) for layers in layer_bytes)
        parts = [
            f"node {name} has a {format_bytes(budget)} budget, which after its runtime ({format_bytes(fixed)}) and "
            f"KV cache ({format_bytes(kv)}) leaves {format_bytes(max(left, 0))} for weights: "
            f"{format_bytes(missing)} missing for even one layer"
            for name, budget, kv, fixed, left, missing in short
        ]
        raise MemoryPlanError(
            f"the model needs {format_bytes(per_token)} of weights per token across {len(names)} nodes but "
            + "; ".join(parts)
            + f" ({format_bytes(sum(entry[-1] for entry in short))} missing in total; give those nodes more memory, "
            "a smaller share, or use a smaller dtype)"
        )
    return MemoryPlan(tuple(decided))


def plan_memory(
    plan: TensorParallelPlan,
    budgets: Sequence[int],
    *,
    names: Sequence[str] | None = None,
    context_length: int = 2048,
    itemsize: int = 4,
    coordinator_bytes: int = 0,
    coordinator_rank: int | None = 0,
    overhead: int = DEFAULT_NODE_OVERHEAD,
    backend: str = "ort",
    layer_file_bytes: Sequence[Sequence[int]] | None = None,
) -> MemoryPlan:
    """Fit a plan: each node's layers, their sizes and its KV heads come from the plan.

    `coordinator_bytes` (embedding, norms, LM head) count against `coordinator_rank`'s budget when
    the coordinator runs on that node; pass None when it runs elsewhere. A quantized plan's layers
    cost what its `backend`'s kernels hold (`runtime.memory_budget.held_layer_bytes`).
    `layer_file_bytes` (per node, per layer) are the written shard files' sizes: what the node
    itself sizes its window from (`runtime.tp_executor`); without them the plan's estimate is
    used, a few KB per layer below the files (their headers).
    """
    cfg = plan.config
    if len(budgets) != len(plan.shards):
        raise ValueError(f"got {len(budgets)} memory budgets for {len(plan.shards)} nodes")
    names = list(names) if names is not None else [str(s.rank) for s in plan.shards]
    kernel = backend if plan.layouts is not None else "float"
    sizes = layer_file_bytes or [[plan.layer_bytes(s.rank, itemsize)] * s.n_layers for s in plan.shards]
    held = [held_layer_bytes(list(node_sizes), kernel) for node_sizes in sizes]
    kv = [kv_cache_bytes(s.n_layers, s.n_kv_heads, cfg.head_dim, context_length, itemsize) for s in plan.shards]
    fixed = [overhead + (coordinator_bytes if s.rank == coordinator_rank else 0) for s in plan.shards]
    return fit_cluster(names, budgets, [r for r, _ in held], kv, fixed, windowed_bytes=[w for _, w in held])


def resident_layer_limits(
    plan: TensorParallelPlan,
    budgets: Sequence[int],
    *,
    context_length: int = 2048,
    itemsize: int = 4,
    overhead: int = DEFAULT_NODE_OVERHEAD,
    backend: str = "ort",
) -> list[int]:
    """Per node of a pipeline `plan` (each rank holds whole layers), how many layers its budget
    holds all resident, KV cache included (0 = no budget: every layer). What lets a pipeline's
    ranges follow memory as well as speed: a small node is given no more layers than it holds,
    where the capacity split alone would make it stream layers from disk beside a node with room."""
    cfg = plan.config
    if len(budgets) != len(plan.shards):
        raise ValueError(f"got {len(budgets)} memory budgets for {len(plan.shards)} nodes")
    kernel = backend if plan.layouts is not None else "float"
    limits = []
    for shard, budget in zip(plan.shards, budgets, strict=True):
        if budget <= 0:
            limits.append(cfg.num_layers)
            continue
        (held,), _ = held_layer_bytes([plan.layer_bytes(shard.rank, itemsize)], kernel)
        kv = kv_cache_bytes(1, shard.n_kv_heads, cfg.head_dim, context_length, itemsize)
        limits.append(min(cfg.num_layers, resident_layers(budget, held, kv, overhead)))
    return limits
